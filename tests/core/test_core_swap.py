"""Swap operations with no model: pages go to CPU swap slots (SwapSlots hands out consecutive runs),
their device pages are freed and reused, and a swap in brings the same KV back into fresh pages."""

from __future__ import annotations

import torch
from core_harness import CoreHarness

from agentserve.cache.kv_cache import KVCache
from agentserve.cache.swap_slots import SwapSlots


def small_cache(num_blocks: int, num_swap_blocks: int) -> KVCache:
    cache = KVCache(num_layers=2, num_blocks=num_blocks, block_size=4, num_kv_heads=1, head_dim=2,
                    dtype=torch.float32, device=torch.device("cpu"), num_swap_blocks=num_swap_blocks)
    cache.pages_per_copy = 2  # several copies per swap, as for large pages on a GPU
    for layer, (k, v) in enumerate(cache.layers):
        k.copy_(torch.arange(k.numel(), dtype=torch.float32).view_as(k) + 1000 * layer)
        v.copy_(-k)
    return cache


def page_contents(cache: KVCache, pages: list[int]) -> list[torch.Tensor]:
    index = torch.tensor(pages)
    return [t.index_select(0, index).clone() for layer in cache.layers for t in layer]


def test_swap_out_free_reuse_swap_in_round_trip() -> None:
    h = CoreHarness(num_blocks=8, block_size=4, enable_prefix_caching=False)
    cache = small_cache(num_blocks=8, num_swap_blocks=6)
    slots = SwapSlots(6)
    holder = slots.allocate(1)  # the first slot is taken: the swap starts at slot 1
    session = h.add("session", [(3 * i) % 50 + 3 for i in range(14)], max_tokens=2)
    h.step()
    pages = list(session.block_table)
    saved = page_contents(cache, pages)

    # Swap out: slots first, then the copy, then the pages go back to the pool.
    swap = slots.allocate(len(pages))
    assert swap == [1, 2, 3, 4]
    cache.swap_out(pages, swap)
    h.abort(session)
    h.pool.check_all_free()

    # Another request takes (and overwrites) the pages meanwhile.
    other = h.add("other", list(range(3, 35)), max_tokens=2)
    h.step()
    for k, v in cache.layers:
        k[torch.tensor(other.block_table)] = 0.0
        v[torch.tensor(other.block_table)] = 0.0
    h.abort(other)

    # Swap in to whatever pages are free now, then release the slots.
    fresh = h.pool.allocate(len(pages))
    cache.swap_in(swap, fresh)
    slots.free(swap)
    for before, after in zip(saved, page_contents(cache, fresh)):
        assert torch.equal(before, after)
    h.pool.free(fresh)
    slots.free(holder)
    assert slots.num_free == 6 and slots.allocate(6) == list(range(6))
    h.pool.check_all_free()


def test_swap_to_fragmented_slots_keeps_each_page_with_its_slot() -> None:
    cache = small_cache(num_blocks=6, num_swap_blocks=6)
    slots = SwapSlots(6)
    held = [slots.allocate(1) for _ in range(6)]
    slots.free(held[1])
    slots.free(held[3] + held[4])
    swap = slots.allocate(3)  # no run of 3: pieces [1] and [3, 4]
    assert swap == [1, 3, 4]
    pages = [5, 0, 2]
    saved = page_contents(cache, pages)
    cache.swap_out(pages, swap)
    cache.swap_in(swap, [1, 3, 4])
    for before, after in zip(saved, page_contents(cache, [1, 3, 4])):
        assert torch.equal(before, after)


def test_copy_blocks_copies_every_layer() -> None:
    cache = small_cache(num_blocks=4, num_swap_blocks=0)
    saved = page_contents(cache, [0, 2])
    cache.copy_blocks([(0, 1), (2, 3)])
    for before, after in zip(saved, page_contents(cache, [1, 3])):
        assert torch.equal(before, after)


def test_swap_in_in_two_halves_equals_swap_in() -> None:
    # SwapInStart copies the slots (runs of consecutive slots, pieces of pages_per_copy) into staging;
    # SwapInFinish writes them into the pages it is given, position by position.
    cache = small_cache(num_blocks=8, num_swap_blocks=8)
    pages, slots = [1, 2, 5, 6, 7], [0, 1, 2, 5, 6]
    saved = page_contents(cache, pages)
    cache.swap_out(pages, slots)
    for k, v in cache.layers:
        k.zero_()
        v.zero_()
    cache.swap_in_start(slots, ticket=3)
    assert cache.swap_in_ready(3)  # CPU: the copy is done when queued
    back = [7, 0, 3, 4, 1]
    cache.swap_in_finish(back, ticket=3)
    for before, after in zip(saved, page_contents(cache, back)):
        assert torch.equal(before, after)
    assert not cache._staged_in  # the staging buffers go with the finish
