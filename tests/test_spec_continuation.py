"""Draft proposals queued on the device behind each verification (spec/continuation.py), on the CPU's
eager path: outputs identical to no speculation, proposals identical to the host's, and the draft KV
they write right (the target as its own draft accepts every proposal only if every continued
catch-up and decode step used the right tokens, positions and slots)."""

from __future__ import annotations

import gc
from typing import Any

import pytest
import torch

from agentserve import SamplingParams
from agentserve.llm import LLM
from agentserve.request import Request
from agentserve.testing import ARCHS, tiny_model_cached
from agentserve.worker.continuation_graphs import ContinuationGraphs
from helpers.spec_models import record_replays, small_draft

# Chunked prefill, prefix caching and a pool small enough to preempt (as tests/test_spec_decode.py).
ENGINE = dict(device="cpu", dtype="float32", max_num_batched_tokens=16, enable_prefix_caching=True,
              num_blocks=22, block_size=4, decode_reserve_tokens=0, spec_dynamic=False, num_speculative_tokens=3)
SHARED = [5, 6, 7, 8, 9, 10, 5, 6, 7, 8]
PROMPTS = [SHARED + [(3 * i + j) % 7 + 11 for j in range(4 + 5 * i)] for i in range(4)]
MAX_TOKENS = [9, 20, 13, 17]  # rows leave the batch at different steps: the rest keep their continuations


def run(arch: str, draft: str | None, continuation: bool = True, async_scheduling: bool = False,
        **params: Any) -> tuple[list[list[int]], Any]:
    extra = dict(draft_model=draft, spec_device_continuation=continuation) if draft is not None else {}
    llm = LLM(str(tiny_model_cached(arch)), async_scheduling=async_scheduling, **{**ENGINE, **extra})
    outs = llm.generate(PROMPTS, [SamplingParams(max_tokens=n, ignore_eos=True, **params) for n in MAX_TOKENS])
    metrics = llm.engine.metrics
    llm.engine.pool.check_all_free()
    llm.close()
    return [o.outputs[0].token_ids for o in outs], metrics


@pytest.mark.parametrize("async_scheduling", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_target_as_its_own_draft_accepts_every_continued_proposal(arch: str, async_scheduling: bool) -> None:
    want, _ = run(arch, None, async_scheduling=async_scheduling, temperature=0.0)
    got, m = run(arch, str(tiny_model_cached(arch)), async_scheduling=async_scheduling, temperature=0.0)
    assert got == want
    assert m.num_preemptions_total > 0  # the pool is small enough to preempt
    # Most proposals came from the device (the first of each request, and those after a
    # preemption or a prefill chunk, from the host).
    assert m.spec_num_continued_proposals > m.spec_num_drafts // 2
    assert m.spec_num_accepted_tokens == m.spec_num_draft_tokens


@pytest.mark.parametrize("arch", ARCHS)
def test_a_different_draft_proposes_the_same_from_the_device_as_from_the_host(arch: str) -> None:
    want, _ = run(arch, None, temperature=0.0)
    on, m_on = run(arch, small_draft(arch), continuation=True, temperature=0.0)
    off, m_off = run(arch, small_draft(arch), continuation=False, temperature=0.0)
    assert on == off == want
    assert m_on.spec_num_continued_proposals > 0 and m_off.spec_num_continued_proposals == 0
    assert m_on.spec_num_rejected_rows > 0  # most proposals of a different draft are rejected
    # The same drafts, wherever they were proposed: the same acceptance at every position.
    assert m_on.spec_accepted_per_position == m_off.spec_accepted_per_position
    assert m_on.spec_num_draft_tokens == m_off.spec_num_draft_tokens


def test_random_rows_continue_and_seeded_rows_do_not() -> None:
    arch = "llama"
    draft = str(tiny_model_cached(arch))
    _, m = run(arch, draft, temperature=0.8)
    # q = p for the target as its own draft: min(1, p / q) accepts (almost) everything.
    assert m.spec_num_continued_proposals > m.spec_num_drafts // 2
    assert m.spec_num_accepted_tokens >= 0.95 * m.spec_num_draft_tokens
    first, m_seeded = run(arch, draft, temperature=0.8, seed=7)
    again, _ = run(arch, draft, temperature=0.8, seed=7)
    assert m_seeded.spec_num_continued_proposals == 0 and m_seeded.spec_num_drafts > 0
    assert first == again  # a seeded request is reproducible


class _EagerContinuationGraphs(ContinuationGraphs):
    """The captured continuation's computation run eagerly (no CUDA graph on the CPU): its inputs staged
    as for a replay, then the body the capture records."""

    def _replay(self, size: int, bucket: int, k: int) -> torch.Tensor:
        return self._propose(size, bucket, k)


@pytest.mark.parametrize("arch,async_scheduling", [(arch, False) for arch in ARCHS] + [("llama", True)])
def test_the_continuation_graphs_body_proposes_what_the_eager_continuation_does(arch: str,
                                                                                async_scheduling: bool) -> None:
    """worker/continuation_graphs.py derives every input of the catch-up and the decode steps on the device
    from the verification's output, over padded rows: the same proposals as spec/continuation.py's eager
    path (acceptance per position equal, with a different draft), with chunked prefill and prefix caching."""
    want, _ = run(arch, None, temperature=0.0)
    llm = LLM(str(tiny_model_cached(arch)), async_scheduling=async_scheduling,
              **{**ENGINE, "draft_model": small_draft(arch)})
    runner = llm.engine.runner
    draft = runner.draft
    assert draft is not None and draft.cache is not None
    graphs = _EagerContinuationGraphs(draft.model, draft.cache.layers, llm.engine.config.scheduler.max_num_seqs,
                                      runner.max_blocks_per_seq, 3, draft.block_size, draft.max_model_len,
                                      torch.device("cpu"))
    staged = record_replays(graphs)
    draft.continuation_graphs = graphs
    outs = llm.generate(PROMPTS, [SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.0) for n in MAX_TOKENS])
    m_graphs = llm.engine.metrics
    llm.engine.pool.check_all_free()
    llm.close()
    _, m_eager = run(arch, small_draft(arch), async_scheduling=async_scheduling, temperature=0.0)
    assert [o.outputs[0].token_ids for o in outs] == want
    assert staged and all(staged) and m_graphs.spec_num_continued_proposals > 0
    assert m_graphs.spec_num_rejected_rows > 0
    assert m_graphs.spec_accepted_per_position == m_eager.spec_accepted_per_position
    assert m_graphs.spec_num_draft_tokens == m_eager.spec_num_draft_tokens


def test_an_idle_engine_holds_no_continuation() -> None:
    """A continuation queued behind the last verification names requests that then finish: once no
    request is left, neither those requests nor the continuation's device tensors stay alive."""

    def live_requests() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if type(o) is Request)

    before = live_requests()  # other tests' engines may hold some
    path = str(tiny_model_cached("llama"))
    llm = LLM(path, **{**ENGINE, "draft_model": path})
    llm.generate(PROMPTS, [SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.0) for n in MAX_TOKENS])
    assert llm.engine.metrics.spec_num_continued_proposals > 0
    assert llm.engine.spec_proposer is not None and llm.engine.spec_proposer.pending is None
    assert live_requests() <= before
    llm.close()
