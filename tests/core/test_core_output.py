"""OutputProcessor.update_from_output with no model: a row's target samples come back through a
LaunchedStep built from a tensor, and the accepted tokens are appended one by one (a stop or
max_tokens inside the row finishes the request with tokens left over), the rejected ones roll
num_computed_tokens back, and a finished request's pages go back to the pool."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from core_harness import CoreHarness, Request, RequestStatus, greedy_continuation

from agentserve.engine.metrics import EngineMetrics
from agentserve.engine.output import InflightStep, OutputProcessor
from agentserve.worker.launched_step import LaunchedStep
from agentserve.worker.model_runner import ScheduledChunk

PROMPT = [(17 * i) % 300 + 3 for i in range(7)]


class _FakeEngine(SimpleNamespace):
    """Just the engine state update_from_output touches (a subclass: the processor holds a weak proxy)."""


def processor_over(h: CoreHarness) -> OutputProcessor:
    engine: Any = _FakeEngine(emit_unfinished=True, metrics=EngineMetrics(), kv=h.kv, pool=h.pool,
                                  scheduler=h.scheduler, pending_forks={}, grammar_waits={}, max_model_len=4096,
                                  tokenizer=None, groups={}, requests={}, prompts={}, on_retained=None)
    h.engine = engine  # the processor's proxy is weak: the harness keeps the fake engine alive
    return OutputProcessor(engine)


def launch_row(h: CoreHarness, request: Request, spec: list[int], sampled: list[int]) -> InflightStep:
    """What engine/launch.py does for one decode row verifying `spec`, with `sampled` as the
    target's greedy samples at its 1 + len(spec) positions: the row emits what the rejection sampler
    would (the drafts equal to the target's samples, then the target's sample at the first mismatch),
    padded with -1 to the row's width."""
    num_tokens = 1 + len(spec)
    num_accepted = next((j for j, (d, t) in enumerate(zip(spec, sampled)) if d != t), len(spec))
    emitted = sampled[:num_accepted + 1] + [-1] * (len(spec) - num_accepted)
    assert h.kv.allocate_slots(request, num_tokens) == []
    request.num_computed_tokens += num_tokens
    request.num_output_placeholders += 1
    chunk = ScheduledChunk(request, num_tokens, num_tokens, spec)
    return InflightStep([chunk], LaunchedStep(torch.tensor(emitted), {}, [num_tokens], padded=True),
                        overlappable=False)


def decoding(h: CoreHarness, max_tokens: int, stop_token_ids: list[int] | None = None) -> Request:
    request = h.add("r", PROMPT, max_tokens=max_tokens, stop_token_ids=stop_token_ids)
    h.step()  # prefill and the first token
    return request


def test_rejected_tokens_roll_back_the_computed_count() -> None:
    h = CoreHarness(block_size=4)
    r = decoding(h, max_tokens=10)
    a, b, c, d = greedy_continuation(r.all_token_ids, 4)
    tokens_before = r.num_tokens
    touched = processor_over(h).update_from_output(launch_row(h, r, [a, 999, c], [a, b, c, d]))
    assert touched == {"r"} and r.output_token_ids[-2:] == [a, b]
    assert r.num_computed_tokens == tokens_before + 1 == r.num_tokens - 1
    assert r.num_output_placeholders == 0 and r.spec_token_ids == []


def test_max_tokens_reached_inside_a_row_finishes_with_tokens_left() -> None:
    h = CoreHarness(block_size=4)
    r = decoding(h, max_tokens=3)
    spec = greedy_continuation(r.all_token_ids, 4)
    processor_over(h).update_from_output(launch_row(h, r, spec[:3], spec))
    assert r.status == RequestStatus.FINISHED_LENGTH and r.output_token_ids[1:] == spec[:2]
    # The last appended token's KV does not count; the pages went back to the pool.
    assert r.num_computed_tokens == r.num_tokens - 1 and r.block_table == []
    h.pool.check_all_free()


def test_a_stop_token_among_the_accepted_ones_ends_the_row() -> None:
    h = CoreHarness(block_size=4)
    p = greedy_continuation(PROMPT, 6)
    r = decoding(h, max_tokens=10, stop_token_ids=[p[2]])
    assert p[2] not in p[:2]
    spec = p[1:5]
    processor_over(h).update_from_output(launch_row(h, r, spec[:3], spec))
    assert r.status == RequestStatus.FINISHED_STOPPED and r.stop_reason == p[2]
    assert r.output_token_ids == p[:3]
    h.pool.check_all_free()
