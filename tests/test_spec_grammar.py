"""Grammar + speculation: proposals are made under the request's constraint (the draft under a copy of
its matcher, n-gram proposals cut at the first refused token) and verified under the mask at every
scored position, so every finished output stays valid: the real-world schema sample and tool calls
(tool_choice required and auto), random and greedy sampling, both proposers. Greedy constrained
outputs equal those without speculation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from agentserve import SamplingParams
from agentserve.grammar.tool_parser import ToolCallParser
from agentserve.llm import LLM
from agentserve.testing import TOOL_CALL_FORMAT, tiny_model_cached
from helpers.spec_models import noisy_draft

ARCH = "qwen2"
SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "schemas" / "sample.jsonl"
NUM_SCHEMAS = 12
# Bounded arguments: a random-weight model wanders inside free strings, and a call cut off by
# max_tokens ("length") would show nothing about validity.
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Get the current weather for a city",
                                      "parameters": {"type": "object", "properties": {
                                          "city": {"type": "string", "maxLength": 10}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "read_file", "description": "Read a file",
                                      "parameters": {"type": "object", "properties": {
                                          "path": {"enum": ["notes.txt", "todo.md"]}}, "required": ["path"]}}},
]
MAX_TOKENS = 256


def proposer(kind: str) -> dict[str, Any]:
    if kind == "ngram":
        return dict(speculative_method="ngram", prompt_lookup_min=1, spec_dynamic=False)
    return dict(draft_model=noisy_draft(ARCH), spec_dynamic=False)


def make_llm(**spec: Any) -> LLM:
    return LLM(str(tiny_model_cached(ARCH)), device="cpu", dtype="float32", max_num_seqs=64, max_model_len=1024,
               **spec)


def schemas() -> list[dict[str, Any]]:
    if not SAMPLE.exists():
        pytest.skip(f"schema sample not found at {SAMPLE}")
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines() if line.strip()]
    return rows[:NUM_SCHEMAS]


@pytest.mark.parametrize("kind", ["ngram", "draft"])
def test_schema_outputs_validate_with_speculation(kind: str) -> None:
    rows = schemas()
    llm = make_llm(**proposer(kind))
    params = [SamplingParams(json_schema=r["schema"], temperature=t, seed=i, max_tokens=MAX_TOKENS)
              for i, r in enumerate(rows) for t in (0.0, 1.0)]
    outs = llm.generate(["Output JSON:"] * len(params), params)
    finished = 0
    for out, p in zip(outs, params):
        if out.error is not None:
            assert "could not be compiled" in out.error  # a schema the backend refuses, not a spec failure
            continue
        completion = out.outputs[0]
        if completion.finish_reason == "length":
            continue
        assert completion.finish_reason == "stop"
        jsonschema.validate(json.loads(completion.text), p.json_schema)
        finished += 1
    assert finished >= len(params) // 8  # a random-weight model often wanders past max_tokens ("length")
    m = llm.engine.metrics
    assert m.spec_num_accepted_tokens > 0


@pytest.mark.parametrize("kind", ["ngram", "draft"])
def test_greedy_constrained_outputs_equal_plain(kind: str) -> None:
    rows = schemas()[:8]
    params = [SamplingParams(json_schema=r["schema"], temperature=0.0, max_tokens=64) for r in rows]
    plain = [o.outputs[0].token_ids for o in make_llm().generate(["Output JSON:"] * len(rows), params)]
    spec = [o.outputs[0].token_ids for o in make_llm(**proposer(kind)).generate(["Output JSON:"] * len(rows), params)]
    assert spec == plain


@pytest.mark.parametrize("kind", ["ngram", "draft"])
@pytest.mark.parametrize("tool_choice", ["required", "auto"])
def test_tool_calls_stay_valid_with_speculation(kind: str, tool_choice: str) -> None:
    llm = make_llm(**proposer(kind))
    fmt = TOOL_CALL_FORMAT[ARCH]
    messages = [{"role": "user", "content": "Weather in Paris? Also read notes.txt."}]
    by_name = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    prompt = llm.render_chat(messages, tools=TOOLS)
    params = [SamplingParams(temperature=1.0, seed=seed, max_tokens=128, skip_special_tokens=False, tools=TOOLS,
                             tool_choice=tool_choice) for seed in range(8)]
    num_calls = 0
    for out in llm.generate([prompt] * len(params), params):
        completion = out.outputs[0]
        if completion.finish_reason == "length":
            continue
        parser = ToolCallParser(fmt, TOOLS)
        parser.feed(completion.text)
        _, calls = parser.finish()
        if tool_choice == "required":
            assert calls, completion.text
        for call in calls:
            jsonschema.validate(call.arguments, by_name[call.name])
        num_calls += len(calls)
    if tool_choice == "required":
        assert num_calls > 0
    assert llm.engine.metrics.spec_num_draft_tokens > 0
