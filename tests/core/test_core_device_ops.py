"""Device ops travel with the step: what sessions queue on the scheduler (swap out, swap in) comes out
in the next SchedulerOutput, ahead of that step's own copy-on-write copies, and runs before the
step's writes; a swap out / swap in round trip through the steps brings the KV back exactly; the
runner's executor runs ops in order and never twice."""

from __future__ import annotations

import torch
from core_harness import CoreHarness

from agentserve.cache.device_ops import CopyBlocks, SwapInFinish, SwapInStart, SwapOut, execute_device_ops
from agentserve.cache.kv_cache import KVCache
from agentserve.cache.swap_slots import SwapSlots

SESSION_PROMPT = [(3 * i) % 50 + 3 for i in range(14)]  # 3 full pages of 4 and 2 tokens


def test_swap_round_trip_goes_through_the_steps_device_ops() -> None:
    h = CoreHarness(num_blocks=8, block_size=4, enable_prefix_caching=False)
    slots = SwapSlots(6)
    turn = h.add("turn", SESSION_PROMPT, max_tokens=3)
    h.step()
    # Between turns the session holds its own references to the turn's pages (the turn ends here).
    held = h.kv.fork_blocks(turn.block_table)
    h.abort(turn)
    kv_before = [list(h.pages.slots[page]) for page in held]
    assert [t for page in kv_before for t in page][:14] == SESSION_PROMPT

    # Eviction (sessions/residency.py): the copy is queued, then the pages go back to the pool at once.
    swap = tuple(slots.allocate(len(held)))
    swap_out = SwapOut(tuple(held), swap)
    h.scheduler.queue_device_ops([swap_out])
    assert h.scheduler.has_device_ops()
    h.pool.free(held)
    h.pool.check_all_free()

    # The next step reuses every page; the queued copy runs before that step's writes.
    other = h.add("other", list(range(3, 35)), max_tokens=2)
    record = h.step()
    assert record.device_ops == [swap_out] and not h.scheduler.has_device_ops()
    assert record.output.device_ops == []  # the executor took each op off the step's list as it ran
    assert set(held) <= set(other.block_table)
    assert all(h.pages.slots[page] != before for page, before in zip(held, kv_before))  # overwritten
    h.abort(other)

    # Restore into whatever pages are free: with nothing to schedule, the step carries only the op.
    fresh = h.pool.allocate(len(held))
    swap_in = [SwapInStart(swap, 0), SwapInFinish(tuple(fresh), 0)]
    h.scheduler.queue_device_ops(swap_in)
    record = h.step()
    assert record.output.is_empty and record.device_ops == swap_in
    assert [h.pages.slots[page] for page in fresh] == kv_before
    slots.free(list(swap))

    # The next turn starts from the restored pages: every step checks that its computed positions
    # read back its own tokens, so a wrong or missing copy fails here.
    resumed = h.make_request("resumed", SESSION_PROMPT + [turn.output_token_ids[0]], max_tokens=4)
    resumed.block_table = fresh
    resumed.num_computed_tokens = len(SESSION_PROMPT)
    h.scheduler.add(resumed)
    first = h.step()
    assert first.num_tokens["resumed"] == 1  # only the token after the restored KV is computed
    h.run()
    assert resumed.num_output_tokens == 4
    h.pool.check_all_free()
    assert slots.num_free == 6


def test_queued_ops_come_before_the_steps_copy_on_write_copies_in_order() -> None:
    h = CoreHarness(num_blocks=16, block_size=4)
    parent = h.add("parent", SESSION_PROMPT[:10], max_tokens=6)
    h.step()
    shared = list(parent.block_table)
    h.fork(parent, "child", max_tokens=6)
    spare = h.pool.allocate(1)
    ops = [SwapOut((shared[0],), (0,)), SwapInStart((0,), 0), SwapInFinish((spare[0],), 0)]
    h.scheduler.queue_device_ops(ops[:1])
    h.scheduler.queue_device_ops(ops[1:])
    record = h.step()
    # The parent writes into the shared partial page 2: a private copy, decided during schedule().
    assert record.device_ops == ops + [CopyBlocks(shared[2], parent.block_table[2])]
    assert h.pages.slots[spare[0]] == h.pages.slots[shared[0]]
    h.pool.free(spare)
    h.run()
    h.pool.check_all_free()


def test_executor_runs_ops_in_order_once() -> None:
    cache = KVCache(num_layers=2, num_blocks=4, block_size=4, num_kv_heads=1, head_dim=2, dtype=torch.float32,
                    device=torch.device("cpu"), num_swap_blocks=2)
    for layer, (k, v) in enumerate(cache.layers):
        k.copy_(torch.arange(k.numel(), dtype=torch.float32).view_as(k) + 1000 * layer)
        v.copy_(-k)
    page0 = [t[0].clone() for layer in cache.layers for t in layer]
    # Order matters: the swap out reads page 1 after the copy wrote it; the swap in reads that slot.
    ops = [CopyBlocks(0, 1), SwapOut((1,), (1,)), SwapInStart((1,), 0), SwapInFinish((3,), 0)]
    execute_device_ops(cache, ops)
    assert ops == []
    for before, layer_tensor in zip(page0, (t for layer in cache.layers for t in layer)):
        assert torch.equal(layer_tensor[1], before) and torch.equal(layer_tensor[3], before)
    # A launch retried with the same (now empty) list repeats nothing, even after page 0 changed.
    for k, v in cache.layers:
        k[0] = 7.0
    execute_device_ops(cache, ops)
    for before, layer_tensor in zip(page0, (t for layer in cache.layers for t in layer)):
        assert torch.equal(layer_tensor[3], before)
