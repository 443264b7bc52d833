"""GPU: speculative decoding through the Triton kernels and CUDA graphs (the draft's decode steps are
graph replays, verification runs the unified kernel at query length k + 1), greedy outputs identical
to no speculation in fp32 on the tiny models, for n-gram lookup, the target as its own draft and a
smaller draft, and with a grammar. Run with `pytest -m gpu`."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
import torch

from agentserve import SamplingParams
from agentserve.llm import LLM
from agentserve.testing import tiny_model_cached
from helpers.spec_models import record_replays, small_draft

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SHARED = [5, 6, 7, 8, 9, 10, 5, 6, 7, 8, 9, 10, 5, 6, 7, 8]
PROMPTS = [SHARED + [(3 * i + j) % 7 + 11 for j in range(6 + 7 * i)] for i in range(6)]
PARAMS = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                           "days": {"type": "integer", "minimum": 1, "maximum": 9}},
          "required": ["city", "days"], "additionalProperties": False}


def make(arch: str, **kw: Any) -> LLM:
    return LLM(str(tiny_model_cached(arch)), device="cuda", dtype="float32", max_num_seqs=16, max_model_len=1024,
               gpu_memory_utilization=0.3, enable_prefix_caching=True, **kw)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("kind", ["ngram", "self", "small"])
def test_greedy_identical_with_speculation_on_the_gpu(arch: str, kind: str) -> None:
    plain = make(arch)
    want = [o.outputs[0].token_ids for o in plain.generate(PROMPTS, PARAMS)]
    plain.close()
    spec: dict[str, Any] = dict(spec_dynamic=False)
    if kind == "ngram":
        spec.update(speculative_method="ngram", prompt_lookup_min=1)
    else:
        spec["draft_model"] = str(tiny_model_cached(arch)) if kind == "self" else small_draft(arch)
    llm = make(arch, **spec)
    if kind != "ngram":
        draft = llm.engine.runner.draft
        assert draft is not None and draft.graphs is not None  # the draft decodes through CUDA graphs
    got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS)]
    assert got == want
    m = llm.engine.metrics
    assert m.spec_num_draft_tokens > 0
    if kind == "self":
        # Every proposal accepted, most of them queued on the device behind their verification
        # (spec/continuation.py, through the draft's catch-up and decode graphs).
        assert m.spec_num_accepted_tokens == m.spec_num_draft_tokens
    if kind != "ngram":
        assert m.spec_num_continued_proposals > m.spec_num_drafts // 2
    llm.engine.pool.check_all_free()
    llm.close()


@pytest.mark.parametrize("kind", ["ngram", "self"])
def test_constrained_outputs_valid_with_speculation_on_the_gpu(kind: str) -> None:
    spec: dict[str, Any] = dict(spec_dynamic=False)
    if kind == "ngram":
        spec.update(speculative_method="ngram", prompt_lookup_min=1)
    else:
        spec["draft_model"] = str(tiny_model_cached("qwen2"))
    llm = make("qwen2", **spec)
    params = [SamplingParams(json_schema=SCHEMA, temperature=1.0, seed=i, max_tokens=128) for i in range(16)]
    outs = llm.generate(["Output JSON:"] * len(params), params)
    finished = [o.outputs[0] for o in outs if o.outputs[0].finish_reason == "stop"]
    assert len(finished) >= 8
    for completion in finished:
        jsonschema.validate(json.loads(completion.text), SCHEMA)
    assert llm.engine.metrics.spec_num_draft_tokens > 0
    llm.close()


def test_fp8_self_draft_in_bf16_through_graphs() -> None:
    """The target as its own FP8 draft (layers and lm_head e4m3: the FP8 GEMV inside the draft's decode
    graphs) in bf16: the target's outputs by vLLM's logprobs-close rule (verification scores k + 1
    positions in one forward, plain decoding one, so bf16 may split at a near-tie), and the FP8 copy's
    proposals mostly accepted."""
    from agentserve.kernels.fp8_utils import FP8_DTYPE
    from helpers.logprobs_close import assert_close_greedy, greedy_result

    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True, logprobs=5)

    def run(llm: LLM) -> tuple[list[list[int]], list[list[dict[int, float]]]]:
        return greedy_result(llm.generate(PROMPTS, params))

    path = str(tiny_model_cached("llama"))
    kw = dict(device="cuda", dtype="bfloat16", max_num_seqs=16, max_model_len=1024, gpu_memory_utilization=0.3)
    with LLM(path, **kw) as plain:
        want = run(plain)
    with LLM(path, draft_model=path, draft_quantization="fp8", spec_dynamic=False, **kw) as llm:
        draft = llm.engine.runner.draft
        assert draft is not None and draft.graphs is not None
        assert draft.model.lm_head.weight_fp8.dtype == FP8_DTYPE
        assert_close_greedy(want, run(llm), "fp8 self-draft")
        m = llm.engine.metrics
        assert m.spec_num_draft_tokens > 0 and m.spec_num_accepted_tokens / m.spec_num_draft_tokens > 0.5
        llm.engine.pool.check_all_free()


def test_continuation_graphs_propose_what_the_eager_continuation_does() -> None:
    """A greedy proposal queued behind its verification as one graph replay (worker/continuation_graphs.py)
    against the eager continuation (spec/continuation.py) on the same engine, with the target as its own
    draft in fp32: every proposal the replays make is accepted (a wrong input anywhere in the graph would
    be rejected), as with the eager path, and the target's outputs are unchanged. (The CPU test runs the
    graph's body against the eager path with a draft whose proposals are partly rejected.)"""
    from agentserve.worker.continuation_graphs import ContinuationGraphs

    plain = make("llama")
    want = [o.outputs[0].token_ids for o in plain.generate(PROMPTS, PARAMS)]
    plain.close()
    llm = make("llama", draft_model=str(tiny_model_cached("llama")), spec_dynamic=False)
    draft = llm.engine.runner.draft
    assert draft is not None and isinstance(draft.continuation_graphs, ContinuationGraphs)
    replayed = record_replays(draft.continuation_graphs)

    def run() -> tuple[list[list[int]], int, int]:
        m = llm.engine.metrics
        proposed, accepted, continued = m.spec_num_draft_tokens, m.spec_num_accepted_tokens, m.spec_num_continued_proposals
        outs = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS)]
        assert m.spec_num_continued_proposals > continued
        return outs, m.spec_num_draft_tokens - proposed, m.spec_num_accepted_tokens - accepted

    outs, proposed, accepted = run()
    assert replayed and all(replayed)
    assert outs == want and proposed > 0 and accepted == proposed
    draft.continuation_graphs = None
    outs, proposed, accepted = run()
    assert outs == want and proposed > 0 and accepted == proposed
    llm.engine.pool.check_all_free()
    llm.close()
