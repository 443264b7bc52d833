"""A client that stops a turn mid-stream and sends the next one at once (an agent's user interrupting it) gets
the next turn, not FAILED_PRECONDITION "already has a turn in flight": the first turn's cancel may still be on
its way to the server when the next Turn arrives, so a session busy with a turn waits a moment for that turn
to end before answering busy. A session really busy with another client's turn still answers busy."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest

from conftest_grpc import SYSTEM, USER, make_engine, rpc_status, run, serving

LONG = [{"role": "user", "content": "Write a long story."}]


@pytest.fixture(scope="module")
def aeng():  # type: ignore[no-untyped-def]
    engine = make_engine(num_blocks=512)
    yield engine
    engine.shutdown()


def test_the_next_turn_right_after_a_cancel_runs(aeng) -> None:  # type: ignore[no-untyped-def]
    async def body() -> None:
        async with serving(aeng) as (_handle, client):
            s = await client.create_session([SYSTEM])
            for round_ in range(5):
                async with contextlib.aclosing(s.turn(LONG, max_tokens=200, ignore_eos=True, temperature=0)) as events:
                    async for ev in events:
                        if ev.HasField("text"):
                            break  # stopped at its first text: the next turn follows at once
                nxt = await s.run_turn(USER, max_tokens=3, temperature=0)
                assert nxt.done.usage.completion_tokens == 3, round_
            info = await s.refresh()
            assert info.num_turns == 5 and not info.busy
            await s.close()

    run(body())


def test_a_session_busy_with_a_running_turn_still_answers_busy(aeng) -> None:  # type: ignore[no-untyped-def]
    async def body() -> None:
        async with serving(aeng) as (_handle, client):
            s = await client.create_session([SYSTEM])
            events = s.turn(LONG, max_tokens=400, ignore_eos=True, temperature=0)
            try:
                async for ev in events:
                    if ev.HasField("text"):
                        break
                code, msg = await rpc_status(s.run_turn(USER, max_tokens=3))
                assert code == grpc.StatusCode.FAILED_PRECONDITION and "in flight" in msg
            finally:
                await events.aclose()
            await asyncio.sleep(0)
            await s.close()

    run(body())
