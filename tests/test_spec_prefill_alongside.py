"""The draft's share of a prompt runs right behind the target's prefill chunks (Speculation.after_launch),
so the first proposal after the first token catches up one token instead of the whole prompt; not at batch
sizes where dynamic speculation proposes nothing (the draft's prefill would cost throughput there)."""

from __future__ import annotations

from typing import Any

from agentserve import SamplingParams
from agentserve.engine.speculation import Speculation
from agentserve.llm import LLM
from agentserve.request import Request
from agentserve.testing import tiny_model_cached
from helpers.spec_models import small_draft

PROMPT = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23]
ENGINE: dict[str, Any] = dict(device="cpu", dtype="float32", max_num_batched_tokens=8, num_speculative_tokens=3)


def _request(llm: LLM) -> Request:
    (req,) = llm.engine.requests.values()
    return req


def test_the_draft_prefills_each_prompt_chunk_as_the_target_does() -> None:
    want = LLM(str(tiny_model_cached("llama")), **ENGINE).generate([PROMPT], SamplingParams(max_tokens=12, temperature=0.0))
    llm = LLM(str(tiny_model_cached("llama")), draft_model=small_draft("llama"), spec_dynamic=False, **ENGINE)
    engine = llm.engine
    engine.add_request("r", PROMPT, SamplingParams(max_tokens=12, temperature=0.0))
    req = _request(llm)
    seen = []
    while req.num_computed_tokens < len(PROMPT):
        engine.step()
        # Chunks of 8 prompt tokens: the draft's KV follows the target's chunk by chunk.
        seen.append((req.num_computed_tokens, req.num_draft_computed_tokens))
    assert seen == [(8, 8), (16, 16), (19, 19)]
    while engine.has_unfinished():
        engine.step()
    assert req.output_token_ids == want[0].outputs[0].token_ids
    assert engine.metrics.spec_num_draft_tokens > 0
    llm.close()


def test_no_draft_prefill_where_dynamic_speculation_proposes_nothing() -> None:
    llm = LLM(str(tiny_model_cached("llama")), draft_model=small_draft("llama"), **ENGINE)
    spec = llm.engine.spec_proposer
    assert isinstance(spec, Speculation)
    spec.acceptance = 0.0  # measured acceptance that makes k = 0 at any batch size
    spec._update_acceptance = lambda: None  # type: ignore[method-assign]
    llm.engine.add_request("r", PROMPT, SamplingParams(max_tokens=4, temperature=0.0))
    req = _request(llm)
    while llm.engine.has_unfinished():
        llm.engine.step()
    assert req.num_draft_computed_tokens == 0 and llm.engine.metrics.spec_num_drafts == 0
    llm.close()
