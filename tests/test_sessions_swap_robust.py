"""Session swap robustness (sessions/residency.py, cache/kv_cache.py): a swap in whose copy is still
in flight when its freed swap slots are reused, slow swap-in copies under concurrent adapter turns
with speculation and fp8 pages (no stall, exact tokens), and evicting a session that is already
swapped. Every turn is compared with a stateless generate on an engine of the same config."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Optional

import pytest

from agentserve.sampling_params import SamplingParams
from agentserve.sessions.store import SessionStore
from agentserve.sessions.types import SessionState
from conftest_grpc import run_and_shutdown
from helpers.session_turns import Turn, assert_clean, assert_exact, evict, run_turn
from test_sessions_lora_spec import GREEDY, SPEC, SYSTEM, adapters, engine_pair, evict_resident, no_adapter_in_use

__all__ = ["adapters"]  # the module fixture, shared


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_a_swap_in_in_flight_keeps_its_pages_when_its_slots_are_reused(kv_cache_dtype: str) -> None:
    # A swap in frees its swap slots as soon as its copy starts; another session evicted before the
    # copy is finished takes those slots. The staged copy must not be a view of them: on the CPU
    # `.to(device)` returned the slots themselves, and the returning session got the other's pages.
    aeng, reference = engine_pair(64, 24, max_model_len=1024, kv_cache_dtype=kv_cache_dtype)

    async def body() -> None:
        store = SessionStore(aeng)
        residency = store.residency
        back = (await store.create([SYSTEM])).session_id
        other = (await store.create([SYSTEM])).session_id
        turns = [await run_turn(store, back, "Short.", GREEDY),
                 await run_turn(store, other, "Longer: " + "plan the next step; " * 12, GREEDY)]
        assert await evict(store, back) is SessionState.SWAPPED
        arrived = False
        residency.copy_ready = lambda ticket: arrived

        def restore_then_evict_other() -> set[int]:
            s = store.sessions[back]
            slots = set(s.swap_slots)
            assert residency.swap_in(s) and s.restoring is not None  # started, not finished
            residency.evict(store.sessions[other])
            return slots & set(store.sessions[other].swap_slots)

        assert await aeng.run(restore_then_evict_other)  # the other session took the freed slots
        for _ in range(3):  # steps that carry only the device ops: the start, then the swap out
            await aeng.run(lambda: None)
            await asyncio.sleep(0.05)
        arrived = True
        turns.append(await run_turn(store, back, "Back again.", GREEDY))
        assert turns[-1].result.usage.cached_tokens == turns[0].result.session.num_kv_tokens
        turns.append(await run_turn(store, other, "Me too.", GREEDY))
        assert_exact(reference, turns)
        await assert_clean(store)

    run_and_shutdown(aeng, body(), timeout=120)


def test_slow_swap_ins_under_concurrent_adapter_turns_neither_stall_nor_drift(adapters: dict[str, str]) -> None:
    # Swap-in copies that take a few polls to arrive (as on a CUDA copy stream), five sessions on
    # three adapters and the base (one LoRA slot), n-gram speculation and fp8 pages, concurrent turns,
    # evictions and forks. This once stalled for good: the head of the queue needed pages that a
    # queued turn's session held while its restore was in flight (the scheduler had released the
    # turn's own references), and such a session was never evictable.
    aeng, reference = engine_pair(48, 40, max_model_len=1024, kv_cache_dtype="fp8", enable_lora=True, max_loras=1,
                                   max_lora_rank=8, lora_modules=adapters, **SPEC["ngram"])
    rng = random.Random(3)

    async def body() -> None:
        store = SessionStore(aeng)
        polls: dict[int, int] = {}

        def slow(ticket: int) -> bool:
            polls[ticket] = polls.get(ticket, 0) + 1
            return polls[ticket] > 3

        store.residency.copy_ready = slow
        names: list[Optional[str]] = ["a", "b", None, "c", "a"]
        sids = [(await store.create([SYSTEM], adapter=n)).session_id for n in names]
        turns: list[Turn] = []
        for r in range(4):
            aeng.call_soon(lambda: time.sleep(0.05))
            turns += await asyncio.gather(*(run_turn(
                store, sid, f"Agent {i} round {r}: " + "step; " * rng.randint(1, 30),
                SamplingParams(temperature=0.0, max_tokens=rng.randint(4, 24), ignore_eos=True))
                for i, sid in enumerate(sids)))
            for sid in rng.sample(sids, 2):
                await evict_resident(store, sid)
            parent = rng.choice(sids)
            child = (await store.fork(parent)).session_id
            turns += await asyncio.gather(run_turn(store, child, "child", GREEDY), run_turn(store, parent, "parent", GREEDY))
            await store.close(child)
        assert polls and store.stats.swap_ins > 0
        assert_exact(reference, turns)
        await assert_clean(store)
        no_adapter_in_use(aeng)

    run_and_shutdown(aeng, body(), timeout=90)


def test_evicting_a_swapped_session_again_keeps_its_swap_copy() -> None:
    # Residency.evict on a session already swapped out used to overwrite its swap slots with an
    # empty list (leaking them) while keeping its KV count: the next turn then ran on no pages.
    aeng, reference = engine_pair(40, 12, max_model_len=512)

    async def body() -> None:
        store = SessionStore(aeng)
        sid = (await store.create([SYSTEM])).session_id
        turns = [await run_turn(store, sid, "Hello.", GREEDY)]
        assert await evict(store, sid) is SessionState.SWAPPED
        swapped = (await store.get(sid)).num_swapped_pages
        assert swapped > 0 and await evict(store, sid) is SessionState.SWAPPED
        assert (await store.get(sid)).num_swapped_pages == swapped
        assert store.num_free_swap_slots == store.num_swap_slots - swapped
        turns.append(await run_turn(store, sid, "Back in.", GREEDY))
        assert turns[-1].result.usage.swapped_in_tokens == turns[0].result.session.num_kv_tokens
        assert_exact(reference, turns)
        await assert_clean(store)

    run_and_shutdown(aeng, body(), timeout=120)
