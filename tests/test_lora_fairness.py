"""More adapters than device slots under steady traffic: a request whose adapter finds every slot
taken must not wait for ever while new requests keep arriving for the adapters in the slots (each
admitted at once beside its adapter's running requests, keeping that adapter resident for good).
Once such a request has waited lora_slot_wait_s, later requests of the resident adapters wait behind
it, those adapters drain, and it gets a slot; base-model requests, which need no slot, are not held
back. Before that, the resident adapters keep taking requests (full batches). Every request still
gets its adapter's exact greedy tokens (PEFT merged)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import pytest

from agentserve import SamplingParams
from agentserve.llm import LLM
from agentserve.testing import tiny_model_cached
from helpers.lora import ALL_MODULES, build_peft_adapter, peft_greedy

ARCH = "qwen2"
NEW_TOKENS = 4
PROMPT = list(range(7, 20))


@pytest.mark.parametrize("slot_wait_s", [0.0, 3600.0])
def test_an_adapter_waiting_for_a_slot_is_not_starved_by_a_resident_ones_stream(tmp_path: Path,
                                                                               slot_wait_s: float) -> None:
    base = tiny_model_cached(ARCH)
    dirs = {name: build_peft_adapter(base, tmp_path / name, seed=seed, r=8, lora_alpha=16, scale=30.0,
                                     target_modules=list(ALL_MODULES)) for seed, name in enumerate(("a", "b"), 31)}
    llm = LLM(str(base), device="cpu", dtype="float32", max_model_len=256, num_blocks=256, enable_lora=True,
              max_lora_rank=16, max_loras=1, lora_modules={name: str(path) for name, path in dirs.items()},
              lora_slot_wait_s=slot_wait_s)
    engine = llm.engine
    greedy = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    adapter_of: dict[str, Optional[str]] = {"a0": "a", "b": "b"}
    engine.add_request("a0", PROMPT, greedy, lora_name="a")
    engine.step()  # "a" holds the only slot
    engine.add_request("b", PROMPT, greedy, lora_name="b")
    tokens: dict[str, list[int]] = {}
    finished_at: dict[str, int] = {}
    for step in range(60):  # a new request of "a" and one of the base model every step
        for rid, name in ((f"a{step + 1}", "a"), (f"base{step}", None)):
            adapter_of[rid] = name
            engine.add_request(rid, PROMPT, greedy, lora_name=name)
        for out in engine.step():
            if out.finished:
                tokens[out.request_id] = list(out.outputs[0].token_ids)
                finished_at[out.request_id] = step
    if slot_wait_s == 0:
        assert "b" in finished_at, "the request of b never got the slot"
        # It waited for a's requests admitted before it, not for those sent after it: a few requests' time.
        assert finished_at["b"] <= 3 * NEW_TOKENS, finished_at["b"]
    else:  # not overdue yet: a keeps its slot and takes every new request at once
        assert "b" not in finished_at
        assert all(finished_at[f"a{i}"] <= i + NEW_TOKENS for i in range(1, 50)), finished_at
    assert finished_at["base0"] <= NEW_TOKENS  # the base model's requests were never held back
    refs = {name: peft_greedy(base, dirs[name] if name else None, [PROMPT], NEW_TOKENS)[0] for name in ("a", "b", None)}
    assert len({tuple(ref) for ref in refs.values()}) == 3, "adapters agree here: the check would prove nothing"
    for rid, got in tokens.items():
        assert got == refs[adapter_of[rid]], rid
    while engine.has_unfinished():
        engine.step()
    assert engine.pool.num_free_blocks == engine.pool.num_blocks
    llm.close()
