"""The swap-slot allocator: consecutive slots where possible, merges on free, no double use, and next fit:
slots just freed are handed out again only after the search has gone round the swap space."""

import random

import pytest

from agentserve.cache.swap_slots import SwapSlots


def test_allocates_consecutive_runs_and_merges_on_free() -> None:
    slots = SwapSlots(10)
    a, b, c = slots.allocate(3), slots.allocate(4), slots.allocate(3)
    assert (a, b, c) == ([0, 1, 2], [3, 4, 5, 6], [7, 8, 9]) and slots.num_free == 0
    slots.free(a)
    slots.free(c)
    assert slots.allocate(3) == [0, 1, 2]  # next fit, wrapped round past the end
    slots.free([0, 1, 2])
    slots.free(b)  # merges 0..9 back into one range
    assert slots.allocate(10) == list(range(10))


def test_fragmented_allocation_and_errors() -> None:
    slots = SwapSlots(8)
    held = [slots.allocate(2) for _ in range(4)]
    slots.free(held[0])
    slots.free(held[2])
    assert slots.allocate(4) == [0, 1, 4, 5]  # no run of 4: pieces, sorted
    with pytest.raises(ValueError, match="free"):
        slots.allocate(1)
    slots.free(held[1])
    with pytest.raises(ValueError, match="twice"):
        slots.free([3])


def test_random_use_never_hands_out_a_slot_twice() -> None:
    rng = random.Random(0)
    slots, held = SwapSlots(200), []
    for _ in range(2000):
        if held and (rng.random() < 0.5 or slots.num_free == 0):
            slots.free(held.pop(rng.randrange(len(held))))
        else:
            got = slots.allocate(rng.randint(1, min(30, slots.num_free)))
            held.append(got)
        taken = [x for h in held for x in h]
        assert len(taken) == len(set(taken)) and all(0 <= x < 200 for x in taken)
        assert slots.num_free == 200 - len(taken)
    for h in held:
        slots.free(h)
    assert slots.allocate(200) == list(range(200))


def test_slots_just_freed_are_reused_after_the_rest_of_the_space() -> None:
    # A swap in frees its slots when it starts, while its copy may still be queued: the next swap out must
    # not take exactly those slots when others are free (cache/swap_in_pacer.py).
    slots = SwapSlots(100)
    first = slots.allocate(10)
    second = slots.allocate(10)
    slots.free(first)  # a swap in started from 0..9
    assert slots.allocate(10) == list(range(20, 30)), "first fit would hand out 0..9 again"
    assert slots.allocate(70) == list(range(30, 100))
    assert slots.allocate(10) == first  # only once the rest is used: wrapped round
    slots.free(second)
    slots.free(list(range(20, 30)))
    assert slots.allocate(5) == list(range(10, 15))  # after the cursor (10), wrapping to the lowest free range
