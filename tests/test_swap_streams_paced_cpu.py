"""The swap streams' pacing (cache/swap_streams.py, cache/swap_in_pacer.py) on the CPU, with stand-ins for
CUDA's streams and events (copies then run at issue, so a copy issued after its slots were rewritten
would copy the wrong pages): random swap outs, swap-in starts, launched and idle steps and finishes keep
every page exact; and sessions swapping each other out through the gRPC service give the same tokens
paced as without copy streams (a session whose swap in is the only work must not wait for a step that
never comes; queued copies issued by an idle engine run outside the step's inference mode)."""

from __future__ import annotations

import contextlib
import random
from typing import Any

import pytest
import torch

from agentserve.cache import kv_cache as kv_cache_module
from agentserve.cache import swap_in_pacer
from agentserve.cache import swap_streams as swap_streams_module
from agentserve.cache.kv_cache import KVCache
from agentserve.cache.swap_streams import SwapStreams


class FakeStream:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass


class FakeEvent:
    def __init__(self, enable_timing: bool = False) -> None:
        self.recorded = False

    def record(self, stream: Any = None) -> None:
        self.recorded = True

    def query(self) -> bool:
        return self.recorded

    def elapsed_time(self, end: "FakeEvent") -> float:
        return 1.0

    def synchronize(self) -> None:
        pass


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *args: FakeStream())
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: None)
    monkeypatch.setattr(swap_streams_module, "_STAGING_GB", "1")  # not sized from device memory


def _page(cache: KVCache, page: int) -> list[torch.Tensor]:
    return [t[page].clone() for layer in cache.layers for t in layer]


@pytest.mark.parametrize("seed", range(6))
def test_random_swaps_keep_every_page_exact(fake_cuda: None, monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    rng = random.Random(seed)
    monkeypatch.setattr(swap_in_pacer, "CHUNK_BYTES", rng.choice([64, 256, 4096]))
    cache = KVCache(2, 64, 4, 1, 8, torch.float32, torch.device("cpu"), num_swap_blocks=64)
    cache.pages_per_copy = rng.choice([1, 3, 8])
    cache.swap_streams = SwapStreams(torch.device("cpu"), pacing=True)
    cache.pool.normal_()
    swapped: dict[int, list[torch.Tensor]] = {}  # slot -> the page it holds
    free_slots = list(range(64))
    started: dict[int, list[list[torch.Tensor]]] = {}
    finished = 0
    for step in range(60):
        op = rng.random()
        if op < 0.3 and len(free_slots) >= 6:
            pages = rng.sample(range(64), 6)
            slots = [free_slots.pop(rng.randrange(len(free_slots))) for _ in range(6)]
            swapped.update((slot, _page(cache, page)) for page, slot in zip(pages, slots))
            cache.swap_out(pages, slots)
        elif op < 0.55 and swapped:
            slots = rng.sample(sorted(swapped), min(len(swapped), rng.randint(1, 6)))
            cache.swap_in_start(slots, step)
            started[step] = [swapped.pop(slot) for slot in slots]
            free_slots += slots  # freed at the start: a later swap out may reuse them at once
        elif op < 0.75 and started:
            ticket = rng.choice(sorted(started))
            pages = rng.sample(range(64), len(started[ticket]))
            cache.swap_in_finish(pages, ticket)
            for page, want in zip(pages, started.pop(ticket)):
                assert all(torch.equal(a, b) for a, b in zip(_page(cache, page), want)), (seed, step, page)
            finished += 1
        elif op < 0.95:
            cache.step_launched()
        else:
            cache.no_step_launched()
    assert finished >= 3
    cache.release()


def test_sessions_swapping_each_other_out_paced_give_the_same_tokens(fake_cuda: None,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import test_gpu_swap_streams as gpu_tests

    monkeypatch.setattr(gpu_tests, "DEVICE", "cpu")
    init = KVCache.__init__

    def paced_init(cache: KVCache, *args: Any, **kwargs: Any) -> None:
        init(cache, *args, **kwargs)
        if cache.num_swap_blocks:
            cache.swap_streams = SwapStreams(torch.device("cpu"), pacing=True)

    monkeypatch.setattr(KVCache, "__init__", paced_init)
    paced, swap_ins = gpu_tests._session_turns(monkeypatch, True)
    assert swap_ins >= 3
    monkeypatch.setattr(KVCache, "__init__", init)
    monkeypatch.setattr(kv_cache_module, "SWAP_STREAMS", False)
    plain, _ = gpu_tests._session_turns(monkeypatch, False)
    assert paced == plain
