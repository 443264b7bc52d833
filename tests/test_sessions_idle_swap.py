"""Swaps that sessions start while no request runs still happen: the step loop runs a step that
carries only the device ops (no forward), so an idle engine copies an evicted session's pages out,
and a fork of a swapped session copies them back, exactly, with nothing else to step."""

from __future__ import annotations

import asyncio
from typing import Any

import torch

from agentserve.engine.async_engine import AsyncEngine
from agentserve.sampling_params import SamplingParams
from agentserve.sessions.store import SessionStore
from agentserve.sessions.types import SessionState
from conftest_grpc import SYSTEM, make_engine, run, swap_gb_for


async def _ops_drained(aeng: AsyncEngine) -> None:
    for _ in range(200):
        if not await aeng.run(aeng.engine.scheduler.has_device_ops):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the engine left queued device ops unrun while idle")


def _pages(aeng: AsyncEngine, table: list[int]) -> list[torch.Tensor]:
    index = torch.tensor(table)
    return [t.index_select(0, index).clone() for layer in aeng.engine.runner.kv_cache.layers for t in layer]


def test_idle_engine_runs_a_sessions_swap_out_and_swap_in() -> None:
    aeng = make_engine(num_blocks=64, swap_space_gb=swap_gb_for("qwen2", 16))

    async def body() -> None:
        store = SessionStore(aeng)
        try:
            sid = (await store.create([SYSTEM])).session_id
            async for _ in store.turn(sid, [{"role": "user", "content": "Say something short."}],
                                      SamplingParams(temperature=0.0, max_tokens=4)):
                pass
            table: list[int] = await aeng.run(lambda: list(store.sessions[sid].block_table))
            saved = _pages(aeng, table)

            def evict() -> list[int]:
                s = store.sessions[sid]
                store.residency.evict(s)
                assert s.state is SessionState.SWAPPED and aeng.engine.scheduler.has_device_ops()
                return list(s.swap_slots)

            slots = await aeng.run(evict)
            assert len(slots) == len(table)  # the session held every page alone: all of them swapped
            assert not aeng.engine.has_unfinished()
            await _ops_drained(aeng)
            swap = aeng.engine.runner.kv_cache.swap[torch.tensor(slots)]
            layers = [swap[:, layer, kind] for layer in range(swap.shape[1]) for kind in (0, 1)]
            for before, after in zip(saved, layers, strict=True):
                assert torch.equal(before, after)

            # A fork of the swapped session brings its pages back in (an ops-only step again).
            child = await store.fork(sid)
            await _ops_drained(aeng)
            restored: Any = await aeng.run(lambda: list(store.sessions[child.session_id].block_table))
            assert len(restored) == len(table)
            for before, after in zip(saved, _pages(aeng, restored), strict=True):
                assert torch.equal(before, after)
        finally:
            await store.close_all()
            store.detach()

    try:
        run(body())
    finally:
        aeng.shutdown()
