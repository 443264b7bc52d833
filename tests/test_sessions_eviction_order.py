"""Which idle session gives its pages up first among those expected back (sessions/residency.py eviction_order):
the one expected latest (Belady: the pages needed furthest in the future), so a turn that comes back sooner
finds its session resident; with AGENTSERVE_EVICT_ORDER=lru, the least recently used one."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from agentserve.sessions import residency
from conftest_grpc import SYSTEM, make_engine, run, serving
from test_sessions_exactness import GREEDY


@pytest.mark.parametrize("order", ["expected", "lru"])
def test_among_sessions_expected_back_the_latest_expected_goes_first(order: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(residency, "EVICT_ORDER", order)
    aeng = make_engine(num_blocks=64, max_model_len=1024)

    async def body() -> None:
        async with serving(aeng) as (handle, client):
            store = handle.store
            first, second, sooner = [await client.create_session([SYSTEM]) for _ in range(3)]

            def user(name: str) -> list[dict[str, Any]]:
                return [{"role": "user", "content": f"Agent {name}: continue."}]

            await first.run_turn(user("a"), expected_next_turn_ms=60_000, **GREEDY)
            await asyncio.sleep(0.01)
            await second.run_turn(user("b"), expected_next_turn_ms=60_000, **GREEDY)   # same hint, later: back later
            await sooner.run_turn(user("c"), expected_next_turn_ms=5_000, **GREEDY)    # most recent, back soonest
            ids = await aeng.run(lambda: [s.session_id for s in store.residency.eviction_order()])
            expected = [second.id, first.id, sooner.id] if order == "expected" else [first.id, second.id, sooner.id]
            assert ids == expected
            for s in (first, second, sooner):
                await s.close()

    try:
        run(body())
    finally:
        aeng.shutdown()
