"""32 concurrent sessions x 5 turns with forks and closes on one server, the KV pool small enough that
idle sessions get swapped out and back in while others run: every reply is exact, and every page
and swap slot is free once the sessions are closed."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from conftest_grpc import SYSTEM, TOOLS, make_engine, reference, run, serving

N_AGENTS = 32
N_TURNS = 5
MAX_TOKENS = 4
NUM_BLOCKS = 200


def _message(agent: int, turn: int) -> list[dict[str, Any]]:
    if turn % 2:
        return [{"role": "tool", "tool_call_id": f"c{agent}-{turn}",
                 "content": f'{{"agent": {agent}, "turn": {turn}, "rows": [' + ", ".join(str(agent * turn + j) for j in range(6 + agent % 5)) + "]}"}]
    return [{"role": "user", "content": f"Agent {agent}, step {turn}: what next?"}]


def test_32_concurrent_sessions_with_forks_and_closes() -> None:
    aeng = make_engine(num_blocks=NUM_BLOCKS, max_model_len=1024)
    pool = aeng.engine.pool
    records: list[tuple[list[int], list[int]]] = []

    async def turn(session: Any, agent: int, k: int) -> None:
        t = await session.run_turn(_message(agent, k), temperature=0.0, max_tokens=MAX_TOKENS, return_token_ids=True,
                                    expected_next_turn_ms=50 if agent % 3 == 0 else 0)
        # (more than the prompt when a turn was preempted and recomputed under memory pressure)
        assert t.done.usage.cached_tokens + t.done.usage.prefilled_tokens >= t.done.usage.prompt_tokens
        records.append((list(t.done.prompt_token_ids), t.token_ids))

    async def agent(client: Any, i: int) -> None:
        session = await client.create_session([SYSTEM], tools=TOOLS, metadata={"agent": str(i)})
        children = []
        for k in range(N_TURNS):
            await turn(session, i, k)
            if k == 1 and i % 4 == 0:  # fork: the child continues on its own branch
                children.append(await session.fork())
            await asyncio.sleep(0.001 * (i % 7))  # the "tool call"
        for child in children:
            for k in range(2):
                await turn(child, i + 100, k)
            await child.close()
        if i % 5 == 0:
            await session.close()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await session.run_turn(_message(i, 9), max_tokens=2)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND

    async def body() -> None:
        async with serving(aeng) as (handle, client):
            await asyncio.gather(*(agent(client, i) for i in range(N_AGENTS)))
            remaining = await client.list_sessions()
            assert len(remaining) == N_AGENTS - len(range(0, N_AGENTS, 5))
            assert all(s.num_turns == N_TURNS for s in remaining)
            stats = handle.store.stats
            assert stats.swap_outs > 0 and stats.swap_ins > 0, stats  # the pool really was too small
            for info in remaining:
                await client.session(info.session_id).close()
            assert await client.list_sessions() == []
            assert handle.store.num_free_swap_slots == handle.store.num_swap_slots
            health = await client.health()
            assert health.kv_pages_used == 0 and health.num_sessions == 0
        pool.check_all_free()

    try:
        run(body(), timeout=240)
    finally:
        aeng.shutdown()
    n_forks = len(range(0, N_AGENTS, 4))
    assert len(records) == N_AGENTS * N_TURNS + 2 * n_forks
    prompts, replies = zip(*records)
    assert reference(prompts, MAX_TOKENS, tools=TOOLS) == list(replies)
