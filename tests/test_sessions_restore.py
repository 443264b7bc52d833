"""Sessions over gRPC (tiny qwen2, CPU) whose swap-in copies take a while to arrive, as a CUDA copy
stream's do (sessions/residency.py: SwapInStart, then SwapInFinish once the copy is in): the turn
waits in the queue while other requests run, and its reply is exact."""

from __future__ import annotations

import asyncio

from agentserve.service import agent_pb2 as pb
from conftest_grpc import SYSTEM, TOOLS, make_engine, run, serving
from test_sessions_exactness import GREEDY, NEW_MESSAGES, _check_exact, _pressure


def test_a_swap_in_whose_copy_is_slow_to_arrive_keeps_its_turn_queued_and_exact() -> None:
    """The copy of a returning session's pages is reported as not yet arrived for several polls
    (as a CUDA copy stream would while PCIe moves it): the turn stays queued meanwhile, a stateless
    request submitted beside it runs, and the turn's reply is exact once admitted."""
    aeng = make_engine(num_blocks=48, max_model_len=720)
    pool = aeng.engine.pool
    polls: dict[int, int] = {}

    async def body() -> None:
        async with serving(aeng) as (handle, client):
            residency = handle.store.residency

            def slow(ticket: int) -> bool:
                polls[ticket] = polls.get(ticket, 0) + 1
                return polls[ticket] > 3

            residency.copy_ready = slow
            session = await client.create_session([SYSTEM], tools=TOOLS)
            turns = [await session.run_turn(NEW_MESSAGES[0], **GREEDY), await session.run_turn(NEW_MESSAGES[1], **GREEDY)]
            held = (await session.refresh()).num_pages
            await _pressure(client, pool.num_blocks - held + 4, "p1")
            assert (await session.refresh()).state == pb.SESSION_STATE_SWAPPED
            turn, side = await asyncio.gather(
                session.run_turn(NEW_MESSAGES[2], **GREEDY),
                client.generate_done(prompt_token_ids=[5, 6, 7, 8], max_tokens=4, temperature=0, ignore_eos=True))
            assert len(side.token_ids) == 4
            assert turn.done.usage.swapped_in_tokens > 0 and handle.store.stats.swap_ins == 1
            assert all(s.restoring is None for s in handle.store.sessions.values())
            turns.append(turn)
            await session.close()
        _check_exact(turns)

    try:
        run(body())
        assert polls and all(n > 3 for n in polls.values()), polls
    finally:
        aeng.shutdown()
