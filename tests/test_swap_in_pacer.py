"""The swap-in pacer (agentserve/cache/swap_in_pacer.py) on the host, with stand-in events: chunks cover
every row of a swap's runs; a launched step hands out what the copy engine moves in the period's share
less what is in flight, and always something when nothing is; a finish or a swap out of queued slots
forces the queued copies up to theirs, oldest first; finished batches set the rate."""

from __future__ import annotations

from collections import deque
from typing import Any, Optional, cast

import torch

from agentserve.cache import swap_in_pacer
from agentserve.cache.swap_in_pacer import InCopy, SwapInPacer, chunked

MiB = 1 << 20


class FakeEvent:
    def __init__(self, finished: bool = False, ms: float = 0.0) -> None:
        self.finished = finished
        self.ms = ms

    def query(self) -> bool:
        return self.finished

    def elapsed_time(self, end: "FakeEvent") -> float:
        return end.ms


def _copy(chunks_mib: list[int], slots: range) -> InCopy:
    chunks = deque((torch.empty(0), torch.empty(n * MiB, dtype=torch.uint8)) for n in chunks_mib)
    return InCopy(chunks, torch.empty(0), frozenset(slots))


def _counts(work: list[tuple[InCopy, int]]) -> list[tuple[int, int]]:
    return [(id(c), n) for c, n in work]


def test_chunks_cover_every_row_of_every_run_in_order() -> None:
    host = torch.arange(40 * 6, dtype=torch.float32).view(40, 6)  # rows of 24 bytes
    copies = [(host[3:20], range(3, 20)), (host[30:31], range(30, 31)), (host[0:2], range(0, 2))]
    staged = torch.zeros(20, 6)
    chunks = chunked(staged, copies, chunk_bytes=5 * 24)
    assert max(dst.shape[0] for dst, _ in chunks) == 5
    for dst, src in chunks:
        dst.copy_(src)
    assert torch.equal(staged, torch.cat([host[3:20], host[30:31], host[0:2]]))
    one_row = chunked(torch.zeros(20, 6), copies, chunk_bytes=1)  # a chunk smaller than a row: a row each
    assert len(one_row) == 20


def test_a_launch_hands_out_a_chunk_whatever_the_budget() -> None:
    pacer = SwapInPacer(initial_bytes_per_s=1.0)  # a budget of ~0 bytes
    big = _copy([32, 32], range(0, 4))
    pacer.queue(big)
    assert _counts(pacer.due(now=10.0)) == [(id(big), 1)]
    big.chunks.popleft()
    assert _counts(pacer.due(now=10.001)) == [(id(big), 1)]
    big.chunks.popleft()
    assert not pacer.queued


def test_the_budget_is_the_period_share_of_the_shorter_of_this_period_and_the_typical_one() -> None:
    pacer = SwapInPacer(initial_bytes_per_s=3e9)
    first, second = _copy([32] * 4, range(0, 4)), _copy([32] * 40, range(8, 48))
    pacer.queue(first)
    pacer.queue(second)

    def issue(work: list[tuple[InCopy, int]]) -> int:
        for copy, n in work:
            for _ in range(n):
                copy.chunks.popleft()
        return sum(n for _, n in work)

    # The first launch counts MAX_PERIOD_S: 0.7 x 100 ms x 3 GB/s = 200 MiB, six chunks.
    assert _counts(pacer.due(now=0.0)) == [(id(first), 4), (id(second), 2)]
    issue([(first, 4), (second, 2)])
    assert list(pacer.queued) == [second], "the second copy stays queued with its chunks left"
    # Decode-like launches 20 ms apart: 0.7 x 20 ms x 3 GB/s = 40 MiB, one chunk each.
    for i in range(1, 6):
        assert issue(pacer.due(now=0.02 * i)) == 1
    # A long (prefill) period: the typical one still sizes the budget (one chunk, not 0.7 x 100 ms).
    assert issue(pacer.due(now=0.1 + 0.1)) == 1


def test_forcing_issues_everything_up_to_the_copy_or_the_slots_oldest_first() -> None:
    pacer = SwapInPacer()
    a, b, c = _copy([32, 32], range(0, 2)), _copy([32], range(2, 3)), _copy([32, 32, 32], range(3, 6))
    for copy in (a, b, c):
        pacer.queue(copy)
    a.chunks.popleft()  # a's first chunk was issued by an earlier step
    assert _counts(pacer.through(copy=b)) == [(id(a), 1), (id(b), 1)]
    assert list(pacer.queued) == [c]
    assert _counts(pacer.through(slots=[100, 101])) == [], "no queued copy reads those slots"
    assert _counts(pacer.through(slots=[4])) == [(id(c), 3)]
    assert not pacer.queued


def test_finished_batches_set_the_rate() -> None:
    pacer = SwapInPacer(initial_bytes_per_s=25e9)
    pacer.batch_issued(cast(Any, FakeEvent(True)), cast(Any, FakeEvent(True, ms=2.0)), 100_000_000)  # 50 GB/s
    pacer.queue(_copy([32] * 100, range(0, 1)))
    pacer.due(now=0.0)
    assert pacer.bytes_per_s == 0.7 * 25e9 + 0.3 * 50e9
    assert not pacer.batches


def test_an_unissued_copy_has_not_arrived() -> None:
    copy = _copy([1], range(0, 1))
    assert not copy.issued and not copy.arrived()
    copy.done = cast(Any, FakeEvent(True))
    assert copy.arrived()


def test_the_first_call_counts_the_longest_period() -> None:
    pacer = SwapInPacer(initial_bytes_per_s=1e9)
    pacer.queue(_copy([16] * 10, range(0, 1)))
    # 0.7 x MAX_PERIOD_S x 1 GB/s = 70 MB: four 16 MiB chunks.
    assert sum(n for _, n in pacer.due(now=123.0)) == int(swap_in_pacer.PERIOD_SHARE * swap_in_pacer.MAX_PERIOD_S
                                                         * 1e9) // (16 * MiB)


class RecordingPages:
    """Wraps the runner's page store: which of the pacer's two calls each engine step made."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def step_launched(self, inputs_uploaded: Optional[torch.cuda.Event] = None) -> None:
        self.calls.append("step")
        self.inner.step_launched(inputs_uploaded)

    def no_step_launched(self) -> None:
        self.calls.append("idle")
        self.inner.no_step_launched()


def test_the_engine_lets_paced_copies_go_after_each_launch_and_when_it_has_nothing_to_launch() -> None:
    # Without the idle call a session waiting for its swap in (the only work) would wait forever: its
    # copy would be held for a step that never comes.
    from agentserve.engine.engine import Engine
    from agentserve.sampling_params import SamplingParams
    from agentserve.testing.tiny import tiny_model_cached

    engine = Engine.from_kwargs(str(tiny_model_cached("llama")), max_model_len=128, device="cpu")
    pages = RecordingPages(engine.runner.pages)
    engine.runner.pages = cast(Any, pages)
    engine.add_request("r", [1, 2, 3, 4], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    launched = pages.calls.count("step")
    assert launched >= 3 and "idle" not in pages.calls
    engine.step()  # nothing left to launch
    assert pages.calls[-1] == "idle" and pages.calls.count("step") == launched
