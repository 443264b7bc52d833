"""Admission control: a waiting request is admitted only when its whole prompt (plus some output)
fits next to what running requests will still claim, so long prompts queue instead of forcing
running ones out to recompute. Outputs are the same either way."""

from __future__ import annotations

import pytest

from agentserve import SamplingParams
from agentserve.engine.engine import Engine
from agentserve.testing import tiny_model_cached

# 40 pages of 8 tokens = 320 tokens; a request needs 13 pages for its 100-token prompt and 16 once it
# has its 24 output tokens: three prompts fit, three finished requests do not. A 64-token budget
# admits a prompt chunk by chunk.
POOL = dict(device="cpu", max_model_len=256, num_blocks=40, block_size=8, max_num_batched_tokens=64)


def run_batch(decode_reserve_tokens: int) -> tuple[list[list[int]], int]:
    engine = Engine.from_kwargs(str(tiny_model_cached("llama")), decode_reserve_tokens=decode_reserve_tokens,
                                enable_prefix_caching=False, **POOL)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    for i in range(6):
        engine.add_request(f"r{i}", [(7 * i + 3 * j) % 200 + 5 for j in range(100)], params)
    outputs: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = list(out.outputs[0].token_ids)
    engine.pool.check_all_free()
    return [outputs[f"r{i}"] for i in range(6)], engine.metrics.num_preemptions_total


def test_admission_reserve_avoids_preemption_with_identical_outputs() -> None:
    reserved, preempted_reserved = run_batch(decode_reserve_tokens=256)
    greedy_chunks, preempted_greedy = run_batch(decode_reserve_tokens=0)
    assert preempted_reserved == 0
    # Without the output reserve, three prompts are admitted and their decoding runs the pool dry.
    assert preempted_greedy > 0
    assert reserved == greedy_chunks and all(len(t) == 24 for t in reserved)


def test_head_of_line_waits_while_running_requests_hold_the_pool() -> None:
    engine = Engine.from_kwargs(str(tiny_model_cached("llama")), enable_prefix_caching=False, **POOL)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    for i in range(3):
        engine.add_request(f"r{i}", [(5 * i + j) % 200 + 5 for j in range(120)], params)
    engine.step()
    # 120-token prompts with 24 outputs need 18 pages each: two fit in 40, the third waits (it would
    # fit on its first chunk alone).
    for _ in range(4):
        engine.step()
        assert engine.scheduler.num_running <= 2
    assert engine.scheduler.num_running == 2 and engine.scheduler.num_waiting == 1
    while engine.has_unfinished():
        engine.step()
    assert engine.metrics.num_preemptions_total == 0
    engine.pool.check_all_free()


@pytest.mark.parametrize("n,prefix_caching", [(2, False), (2, True), (3, False)])
def test_n_siblings_with_chunked_prefill_in_a_pool_for_one_sequence_finish(n: int, prefix_caching: bool) -> None:
    """With a 16-token step budget the running sibling is admitted chunk by chunk, so admission never fails
    and the queue's pages were never released: the sibling preempted itself for the pages its waiting
    siblings held, was admitted again at once, and ran out at the same point, for ever (1,485 preemptions in
    3,000 steps). A request that preempts itself now takes the queue's pages back first."""
    engine = Engine.from_kwargs(str(tiny_model_cached("llama")), device="cpu", max_model_len=128, num_blocks=4,
                                block_size=16, enable_prefix_caching=prefix_caching, max_num_batched_tokens=16)
    engine.add_request("r", list(range(10, 30)), SamplingParams(n=n, temperature=0.0, max_tokens=40, ignore_eos=True))
    outputs = []
    for _ in range(1000):
        if not engine.has_unfinished():
            break
        outputs += [o for o in engine.step() if o.finished]
    assert not engine.has_unfinished(), f"the engine stalled ({engine.metrics.num_preemptions_total} preemptions)"
    assert [len(c.token_ids) for c in outputs[0].outputs] == [40] * n
    assert len({tuple(c.token_ids) for c in outputs[0].outputs}) == 1  # greedy: the same sequence n times
    engine.pool.check_all_free()


def test_n2_in_a_pool_that_holds_one_sequence_finishes() -> None:
    """n=2 where the pool holds one whole sequence: the sibling, forked onto the leader's pages, waits
    holding a page the preempted leader needs. The scheduler releases the waiting sibling's pages
    (it recomputes later) instead of stalling the engine for everyone."""
    engine = Engine.from_kwargs(str(tiny_model_cached("llama")), device="cpu", max_model_len=64, num_blocks=8,
                                block_size=4, max_num_seqs=1, decode_reserve_tokens=0)
    params = SamplingParams(n=2, temperature=0.0, max_tokens=22, ignore_eos=True)
    engine.add_request("r", list(range(3, 13)), params)
    outputs = []
    for _ in range(400):
        if not engine.has_unfinished():
            break
        outputs += [o for o in engine.step() if o.finished]
    assert not engine.has_unfinished(), "the engine stalled"
    assert [len(c.token_ids) for c in outputs[0].outputs] == [22, 22]
    engine.pool.check_all_free()


def test_long_prefill_token_threshold_caps_each_request_per_step() -> None:
    """vLLM's long_prefill_token_threshold: a long prompt is prefilled at most that many tokens a step, so a short
    prompt queued behind it starts in the first step instead of after the whole long prefill; outputs are the same."""
    prompts = {"long": [(3 * j) % 200 + 5 for j in range(100)], "short": [(5 * j) % 200 + 7 for j in range(6)]}
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    results = []
    for threshold in (0, 16):
        engine = Engine.from_kwargs(str(tiny_model_cached("llama")), long_prefill_token_threshold=threshold, **POOL)
        steps: list[dict[str, int]] = []
        schedule = engine.scheduler.schedule

        def recorded() -> object:
            out = schedule()
            steps.append(dict(out.num_scheduled_tokens))
            return out

        engine.scheduler.schedule = recorded  # type: ignore[method-assign]
        for name, ids in prompts.items():
            engine.add_request(name, ids, params)
        outputs: dict[str, list[int]] = {}
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    outputs[out.request_id] = list(out.outputs[0].token_ids)
        results.append(outputs)
        if threshold:
            assert steps[0] == {"long": 16, "short": 6} and all(max(s.values()) <= 16 for s in steps), steps
        else:
            assert steps[0] == {"long": 64}, steps
    assert results[0] == results[1]
