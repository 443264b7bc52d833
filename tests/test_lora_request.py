"""vLLM's offline LoRA handle: `generate(..., lora_request=LoRARequest(name, id, path))` loads the adapter
on first use and gives PEFT's merged-model tokens, per prompt or for all; mixed with base prompts; a name
already loaded from another directory, both adapter= and lora_request=, and a bad handle are errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentserve import SamplingParams
from agentserve.errors import LoRANotEnabledError
from agentserve.llm import LLM
from agentserve.lora.request import LoRARequest
from agentserve.testing import tiny_model_cached
from helpers.lora import build_peft_adapter, peft_greedy

PROMPTS = [[5, 6, 7, 8, 9], [11, 12, 13, 14]]
NEW = 8
PARAMS = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)


def test_lora_request_loads_on_first_use_and_matches_peft(tmp_path: Path) -> None:
    base = tiny_model_cached("llama")
    a = build_peft_adapter(base, tmp_path / "a", seed=1, scale=30.0, r=8, target_modules=["q_proj", "v_proj"])
    b = build_peft_adapter(base, tmp_path / "b", seed=2, scale=30.0, r=4, target_modules=["o_proj", "down_proj"])
    llm = LLM(str(base), device="cpu", dtype="float32", enable_lora=True, max_loras=2, max_lora_rank=8)
    req_a, req_b = LoRARequest("a", 1, str(a)), LoRARequest("b", 2, str(b))
    out = llm.generate(PROMPTS, PARAMS, lora_request=req_a)
    assert [o.outputs[0].token_ids for o in out] == peft_greedy(base, a, PROMPTS, NEW)
    assert llm.list_adapters() == ["a"]
    mixed = llm.generate(PROMPTS, PARAMS, lora_request=[req_b, None])  # b loads now; the second is base
    assert list(mixed[0].outputs[0].token_ids) == peft_greedy(base, b, PROMPTS[:1], NEW)[0]
    assert list(mixed[1].outputs[0].token_ids) == peft_greedy(base, None, PROMPTS[1:], NEW)[0]
    assert sorted(llm.list_adapters()) == ["a", "b"]
    with pytest.raises(ValueError, match="loaded from"):
        llm.generate(PROMPTS[:1], PARAMS, lora_request=LoRARequest("a", 3, str(b)))
    with pytest.raises(ValueError, match="not both"):
        llm.generate(PROMPTS[:1], PARAMS, adapter="a", lora_request=req_a)
    llm.engine.pool.check_all_free()
    llm.close()


def test_lora_request_needs_lora_and_a_valid_handle() -> None:
    with pytest.raises(ValueError, match="lora_int_id"):
        LoRARequest("a", 0, "/x")
    with pytest.raises(ValueError, match="lora_name"):
        LoRARequest("", 1, "/x")
    llm = LLM(str(tiny_model_cached("llama")), device="cpu", dtype="float32")
    with pytest.raises(LoRANotEnabledError, match="enable_lora"):
        llm.generate(PROMPTS[:1], PARAMS, lora_request=LoRARequest("a", 1, "/x"))
    llm.close()
