"""GPU: swap copies on their own streams (agentserve/cache/swap_streams.py) stay exact while the step's
stream keeps running: pages freed after a swap out and rewritten at once, swap slots reused while an
earlier copy of them may still be in flight, the staged-bytes bound, and sessions swapped out and in
through the gRPC service giving the same tokens with the copy streams as without. Run with
`pytest -m gpu`."""

from __future__ import annotations

import time

import pytest
import torch

from agentserve.cache import kv_cache as kv_cache_module
from agentserve.cache import swap_streams as swap_streams_module
from agentserve.cache.kv_cache import KVCache

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# Large enough that a swap's PCIe copy takes milliseconds: races show up if the ordering is wrong.
DEVICE = "cuda"
LAYERS, BLOCKS, BS, HEADS, DIM = 8, 512, 16, 8, 128


def _cache(num_swap_blocks: int) -> KVCache:
    cache = KVCache(LAYERS, BLOCKS, BS, HEADS, DIM, torch.bfloat16, torch.device("cuda"), num_swap_blocks=num_swap_blocks)
    assert cache.swap_streams is not None, "AGENTSERVE_SWAP_STREAMS=0 in the environment"
    for k, v in cache.layers:
        k.normal_()
        v.normal_()
    return cache


def _pages(cache: KVCache, pages: list[int]) -> list[torch.Tensor]:
    index = torch.tensor(pages, device="cuda")
    return [t.index_select(0, index).clone() for layer in cache.layers for t in layer]


def _assert_pages(cache: KVCache, saved: list[torch.Tensor], pages: list[int]) -> None:
    for before, after in zip(saved, _pages(cache, pages), strict=True):
        assert torch.equal(before, after)


def _busy_rewrite(cache: KVCache, pages: list[int]) -> None:
    """Work on the step's stream that takes a while, then overwrites `pages` (as a later forward
    writing into reused pages would)."""
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    for _ in range(20):
        a = a @ a
        a = a / a.abs().amax().clamp(min=1)
    index = torch.tensor(pages, device="cuda")
    for k, v in cache.layers:
        k.index_fill_(0, index, float(a[0, 0]) + 7.0)
        v.index_fill_(0, index, -3.0)


def test_swapped_out_pages_rewritten_at_once_come_back_exact() -> None:
    torch.manual_seed(0)
    cache = _cache(num_swap_blocks=256)
    pages = list(range(10, 210))  # ~105 MB across the layers
    saved = _pages(cache, pages)
    cache.swap_out(pages, list(range(0, 200)))
    _busy_rewrite(cache, pages)  # no host sync in between: only stream order protects the copy
    back = list(range(300, 500))
    cache.swap_in(list(range(0, 200)), back)
    _assert_pages(cache, saved, back)
    cache.release()


def test_reused_swap_slots_wait_for_the_copies_in_flight() -> None:
    # slots S: swap out A; swap in S -> B; at once swap out C into the same S (write after read);
    # swap in S -> D (read after write). B must hold A's KV and D C's.
    torch.manual_seed(1)
    cache = _cache(num_swap_blocks=128)
    slots = list(range(0, 120))
    a, c = list(range(0, 120)), list(range(120, 240))
    b, d = list(range(240, 360)), list(range(360, 480))
    saved_a, saved_c = _pages(cache, a), _pages(cache, c)
    for _ in range(3):
        cache.swap_out(a, slots)
        cache.swap_in(slots, b)
        cache.swap_out(c, slots)
        cache.swap_in(slots, d)
        _assert_pages(cache, saved_a, b)
        _assert_pages(cache, saved_c, d)
    cache.release()


def test_staged_swap_out_buffers_stay_under_the_bound() -> None:
    torch.manual_seed(2)
    cache = _cache(num_swap_blocks=400)
    assert cache.swap_streams is not None
    assert 1 << 30 <= cache.swap_streams.max_staged_bytes <= 4 << 30  # sized from the free device memory
    cache.swap_streams.max_staged_bytes = 16 << 20
    cache.pages_per_copy = 16  # 8 MiB pieces: the bound holds two
    pages = list(range(0, 400))
    saved = _pages(cache, pages)
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    for _ in range(50):  # the gathers, and the copies after them, queue behind ~10 ms of step work
        a = (a @ a) / 64
    cache.swap_out(pages, list(range(0, 400)))
    assert cache.swap_streams.staged_bytes <= 16 << 20
    assert cache.swap_streams.bound_waits > 0, "the third piece's gather was queued without waiting for the first"
    _busy_rewrite(cache, pages)
    cache.swap_in(list(range(0, 400)), list(range(100, 500)))
    _assert_pages(cache, saved, list(range(100, 500)))
    cache.release()


@pytest.mark.parametrize("pacing", [True, False])
def test_a_started_swap_in_arrives_without_the_step_stream_and_finishes_exact(monkeypatch: pytest.MonkeyPatch,
                                                                              pacing: bool) -> None:
    # Start: the copy runs on the copy stream while the step's stream keeps working (paced: as launched
    # steps let it); ready() turns true by itself; the finish writes the pages. A second start is finished
    # before it arrives, or before it was issued (the step's stream then waits for it): exact too.
    monkeypatch.setattr(swap_streams_module, "SWAP_IN_PACING", pacing)
    torch.manual_seed(3)
    cache = _cache(num_swap_blocks=256)
    pages = list(range(0, 200))
    saved = _pages(cache, pages)
    cache.swap_out(pages, list(range(0, 200)))
    _busy_rewrite(cache, pages)
    assert not cache.swap_in_ready(7), "a ticket not started yet has not arrived"
    cache.swap_in_start(list(range(0, 200)), ticket=7)
    _busy_rewrite(cache, list(range(200, 210)))  # step work meanwhile, on other pages
    deadline = time.monotonic() + 10
    while not cache.swap_in_ready(7):
        assert time.monotonic() < deadline, "the copy never arrived"
        cache.step_launched()  # the engine's steps, each letting the pacer issue what is due
        time.sleep(0.001)
    back = list(range(300, 500))
    cache.swap_in_finish(back, ticket=7)
    _assert_pages(cache, saved, back)
    cache.swap_in_start(list(range(0, 200)), ticket=8)
    cache.swap_in_finish(pages, ticket=8)  # at once: ordered by the stream wait, not by the host
    _assert_pages(cache, saved, pages)
    cache.release()


def test_a_queued_swap_in_reads_its_slots_before_a_swap_out_reuses_them(monkeypatch: pytest.MonkeyPatch) -> None:
    # Paced: the swap in is still queued on the host when its slots (freed at its start) are taken by
    # another session's swap out; the swap out must issue it first, or it would copy the new pages.
    monkeypatch.setattr(swap_streams_module, "SWAP_IN_PACING", True)
    torch.manual_seed(4)
    cache = _cache(num_swap_blocks=128)
    first, second = list(range(0, 100)), list(range(100, 200))
    saved = _pages(cache, first)
    cache.swap_out(first, list(range(0, 100)))
    cache.swap_in_start(list(range(0, 100)), ticket=1)
    assert cache.swap_streams is not None and cache.swap_streams.pacer.queued, "the swap in should wait for a step"
    cache.swap_out(second, list(range(0, 100)))  # the same slots, other contents
    assert not cache.swap_streams.pacer.queued, "the swap out issued the queued swap in first"
    back = list(range(300, 400))
    cache.swap_in_finish(back, ticket=1)
    _assert_pages(cache, saved, back)
    cache.release()


def _session_turns(monkeypatch: pytest.MonkeyPatch, streams: bool) -> tuple[list[list[int]], int]:
    """Two sessions that evict each other in turn (every turn swaps one out and the other in)."""
    from conftest_grpc import SYSTEM, make_engine, run, serving

    monkeypatch.setattr(kv_cache_module, "SWAP_STREAMS", streams)
    aeng = make_engine(device=DEVICE, dtype="float32", num_blocks=36, max_model_len=720)
    # Different text per session: their pages must not be shared through the prefix cache.
    messages = [[[{"role": "user", "content": f"Agent {a} step {i}: read file_{a}{i}.txt, report its size " * 3}]
                 for a in range(2)] for i in range(4)]
    tokens: list[list[int]] = []

    async def body() -> int:
        async with serving(aeng) as (handle, client):
            sessions = [await client.create_session([SYSTEM]) for _ in range(2)]
            for turn in messages:
                for s, message in zip(sessions, turn):
                    t = await s.run_turn(message, temperature=0.0, max_tokens=24, ignore_eos=True, return_token_ids=True)
                    tokens.append(list(t.token_ids))
            for s in sessions:
                await s.close()
            return handle.store.stats.swap_ins

    try:
        swap_ins = run(body())
    finally:
        aeng.shutdown()
    return tokens, swap_ins


def test_sessions_swapping_each_other_out_match_the_single_stream_copies(monkeypatch: pytest.MonkeyPatch) -> None:
    with_streams, swap_ins = _session_turns(monkeypatch, True)
    assert swap_ins >= 3, "the workload must swap sessions in (pool too large for the test)"
    without, _ = _session_turns(monkeypatch, False)
    assert with_streams == without
