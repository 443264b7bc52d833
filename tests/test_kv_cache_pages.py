"""KVCache's page moves (copy_blocks, swap_out, swap_in, the two-op swap in) on the pooled layout: one
gather or scatter over the page-major view reaches every layer's K and V views, bit for bit, for 16-bit
and fp8 pages, across runs longer than one staged piece."""

from __future__ import annotations

import pytest
import torch

from agentserve.cache.kv_cache import KVCache
from agentserve.kernels.fp8_utils import FP8_DTYPE


def _filled(dtype: torch.dtype) -> KVCache:
    cache = KVCache(num_layers=3, num_blocks=12, block_size=4, num_kv_heads=2, head_dim=8, dtype=dtype,
                    device=torch.device("cpu"), num_swap_blocks=10)
    g = torch.Generator().manual_seed(0)
    for k, v in cache.layers:
        k.copy_(torch.randn(k.shape, generator=g).to(dtype))
        v.copy_(torch.randn(v.shape, generator=g).to(dtype))
    cache.pages_per_copy = 2  # runs split into pieces of two pages
    return cache


def _pages(cache: KVCache, blocks: list[int]) -> list[torch.Tensor]:
    return [t[blocks].view(torch.uint8).clone() for layer in cache.layers for t in layer]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, FP8_DTYPE])
def test_copy_and_swap_round_trips_every_layer(dtype: torch.dtype) -> None:
    cache = _filled(dtype)
    assert all(k.data_ptr() != v.data_ptr() for k, v in cache.layers)
    before = _pages(cache, [1, 2, 3, 7, 8])
    cache.copy_blocks([(1, 10), (7, 11)])
    assert all(torch.equal(a, b) for a, b in zip(_pages(cache, [10, 11]), _pages(cache, [1, 7])))
    cache.swap_out([1, 2, 3, 7, 8], [4, 5, 6, 0, 1])  # two runs of consecutive slots, pieces of two
    for k, v in cache.layers:  # the pages are free to be rewritten once the swap is queued
        k[[1, 2, 3, 7, 8]] = torch.zeros_like(k[[1, 2, 3, 7, 8]])
        v[[1, 2, 3, 7, 8]] = torch.zeros_like(v[[1, 2, 3, 7, 8]])
    cache.swap_in([4, 5, 6, 0, 1], [0, 4, 5, 6, 9])
    assert all(torch.equal(a, b) for a, b in zip(_pages(cache, [0, 4, 5, 6, 9]), before))
    cache.swap_in_start([6, 0], ticket=3)
    cache.swap_in_finish([2, 3], ticket=3)
    assert all(torch.equal(a, b) for a, b in zip(_pages(cache, [2, 3]), _pages(cache, [5, 6])))


def test_copy_blocks_in_pieces_and_chained_pairs() -> None:
    cache = _filled(torch.bfloat16)  # pages_per_copy 2: five pairs are three pieces
    want = _pages(cache, [0, 1, 2, 3, 4])
    cache.copy_blocks([(0, 5), (1, 6), (2, 7), (3, 8), (4, 9)])
    assert all(torch.equal(a, b) for a, b in zip(_pages(cache, [5, 6, 7, 8, 9]), want))
    before = _pages(cache, [1, 2])
    cache.copy_blocks([(1, 2), (2, 3)])  # a chain: page 3 gets page 2 as it was before the copy
    assert all(torch.equal(a, b) for a, b in zip(_pages(cache, [2, 3]), before))


def test_a_swap_of_scattered_slots_is_one_gather_or_scatter_per_piece(monkeypatch: pytest.MonkeyPatch) -> None:
    # Slots in five runs of one or two (kept swap copies and released slots fragment them): the pages
    # still move in pieces of pages_per_copy, one gather (out) or scatter (in) each, with one host copy
    # per run of consecutive slots inside a piece; the swap in's rows own their memory, so slots reused
    # by a later swap out before the finish do not change what the finish writes.
    cache = _filled(torch.bfloat16)
    cache.pages_per_copy = 4
    calls = {"gather": 0, "scatter": 0}
    gather, scatter = cache.gather, cache.scatter

    def counted_gather(index: torch.Tensor) -> torch.Tensor:
        calls["gather"] += 1
        return gather(index)

    def counted_scatter(index: torch.Tensor, pages: torch.Tensor) -> None:
        calls["scatter"] += 1
        scatter(index, pages)

    monkeypatch.setattr(cache, "gather", counted_gather)
    monkeypatch.setattr(cache, "scatter", counted_scatter)
    blocks, slots = [5, 0, 9, 2, 7, 3], [8, 1, 2, 6, 4, 5]
    before = _pages(cache, blocks)
    cache.swap_out(blocks, slots)
    assert calls == {"gather": 2, "scatter": 0}  # 6 pages in pieces of 4: two, over five slot runs
    cache.swap_in_start(slots, ticket=1)
    cache.swap_out([11, 10, 1, 4, 6, 8], slots)  # the slots are reused before the finish
    back = [1, 4, 6, 8, 10, 11]
    cache.swap_in_finish(back, ticket=1)
    assert calls == {"gather": 4, "scatter": 2}
    assert all(torch.equal(a, b) for a, b in zip(_pages(cache, back), before))
