"""Every schema of the real-world sample that the default backend compiles: outputs of a tiny
random-weight model (garbage unless constrained), 2 seeds each, through the engine, all parse and
validate with jsonschema. Coverage (share compiled) is reported, not hidden."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from agentserve import SamplingParams
from agentserve.grammar.interface import GrammarError
from agentserve.grammar.registry import get_backend
from agentserve.grammar.spec import ConstraintSpec
from agentserve.grammar.tokenizer_info import TokenizerInfo
from agentserve.grammar.compiler import GrammarCompiler
from agentserve.llm import LLM
from agentserve.testing import tiny_model_cached

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "schemas" / "sample.jsonl"
# Two seeds per schema (three before): this test is the suite's slowest (113 s on 2026-12-02, 270-352 s
# on 2026-12-03's slower runs), and `make test` must stay under 30 minutes on the 2-core CI machine.
SEEDS = (0, 1)
MAX_TOKENS = 768
# Every output in one batch: the tiny model's step costs about the same at 128 rows as at 700, so one wave of
# 768 steps instead of six runs the test in ~64 s instead of ~121 s (2026-12-06, alone on this machine).
MAX_NUM_SEQS = 1024


def load_sample() -> list[dict]:
    if not SAMPLE.exists():
        pytest.skip(f"schema sample not found at {SAMPLE}")
    return [json.loads(line) for line in SAMPLE.read_text().splitlines() if line.strip()]


def test_engine_outputs_validate_on_every_compiled_schema() -> None:
    llm = LLM(str(tiny_model_cached("qwen2")), device="cpu", max_num_seqs=MAX_NUM_SEQS, max_model_len=2048,
              max_num_batched_tokens=4096)
    rows = load_sample()
    tok = llm.tokenizer
    info = TokenizerInfo.from_hf(tok, vocab_size=llm.engine.arch.vocab_size,
                                 eos_token_ids=sorted(llm.engine.eos_token_ids))
    compiler = GrammarCompiler(get_backend("auto"), info, max_workers=2, timeout_s=10.0)
    compiled = []
    for row in rows:
        try:
            compiler.submit(ConstraintSpec.json_schema(row["schema"])).result(timeout=60)
            jsonschema.validators.validator_for(row["schema"]).check_schema(row["schema"])
            compiled.append(row)
        except (GrammarError, jsonschema.SchemaError):
            continue
    coverage = len(compiled) / len(rows)
    print(f"default backend compiled {len(compiled)}/{len(rows)} schemas ({coverage:.0%})")
    assert coverage > 0.85

    prompts, params = [], []
    for row in compiled:
        for seed in SEEDS:
            prompts.append("Output JSON:")
            params.append(SamplingParams(json_schema=row["schema"], temperature=1.0, seed=seed, max_tokens=MAX_TOKENS))
    outs = llm.generate(prompts, params)
    invalid, unfinished = [], []
    for i, out in enumerate(outs):
        row = compiled[i // len(SEEDS)]
        completion = out.outputs[0]
        assert out.error is None, f"{row['id']}: {out.error}"
        if completion.finish_reason == "length":
            unfinished.append(row["id"])  # cut off by max_tokens: reported as "length", never as valid
            continue
        assert completion.finish_reason == "stop"
        try:
            jsonschema.validate(json.loads(completion.text), row["schema"])
        except (json.JSONDecodeError, jsonschema.ValidationError) as e:
            invalid.append(f"{row['id']} seed {i % len(SEEDS)}: {str(e)[:200]}")
    print(f"{len(outs)} outputs: {len(outs) - len(unfinished)} finished, {len(unfinished)} hit max_tokens")
    assert not invalid, f"{len(invalid)} invalid outputs, e.g. {invalid[:3]}"
    # A random-weight model wanders: schemas that allow extra keys or unbounded strings and arrays can
    # run past any max_tokens. Those outputs end as "length" (checked above: never "stop"); every
    # output that ended normally validated. A good share must end normally for the check to mean
    # something (measured: about half of the 999 outputs finish within 768 tokens).
    assert len(unfinished) <= 0.6 * len(outs), f"too many outputs hit max_tokens: {unfinished[:10]}"
    finished_schemas = {compiled[i // len(SEEDS)]["id"] for i, o in enumerate(outs) if o.outputs[0].finish_reason == "stop"}
    print(f"{len(finished_schemas)}/{len(compiled)} schemas had at least one finished, validated output")
