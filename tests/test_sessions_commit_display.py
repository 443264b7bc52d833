"""A committed turn is shown by GetSession as TurnDone gives it from the commit on, and a turn's time is not
idle time:
- the display (tool calls parsed out) was recorded by the turn's task after it read the last output, so a
  client's cancel after the engine had finished (the turn kept whole) left GetSession showing the raw call
  text with no tool_calls, and a fork taken in between kept that raw text for good;
- the TTL's idle clock restarted only when a turn committed, so a session whose long turn was cancelled was
  closed by expiry at once (the proto: ttl_seconds is *idle* time)."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from agentserve.sessions.store import SessionStore
from conftest_grpc import SYSTEM, TOOLS, make_engine, run, serving

USER = {"role": "user", "content": "Weather in Paris?"}


def test_a_turn_kept_after_a_late_cancel_shows_its_tool_calls(monkeypatch: Any) -> None:
    aeng = make_engine(num_blocks=256, max_model_len=1024)
    cancel_after_commit = {"on": False}
    retained = SessionStore._on_retained

    def commit_then_cancel(self: SessionStore, out: Any) -> None:  # the client's cancel lands right after the commit
        pending = self._pending.get(out.request_id)
        retained(self, out)
        if cancel_after_commit["on"] and pending is not None and pending.committed and pending.task is not None:
            pending.loop.call_soon_threadsafe(pending.task.cancel)

    monkeypatch.setattr(SessionStore, "_on_retained", commit_then_cancel)

    async def body() -> None:
        async with serving(aeng) as (handle, client):
            base = await client.create_session([SYSTEM, USER], tools=TOOLS)
            plain = await base.fork()
            done = (await plain.run_turn(max_tokens=60, temperature=0, tool_choice="required")).done
            cancelled = await base.fork()
            cancel_after_commit["on"] = True
            try:
                await cancelled.run_turn(max_tokens=60, temperature=0, tool_choice="required")
            except grpc.aio.AioRpcError as e:
                assert e.code() == grpc.StatusCode.CANCELLED
            cancel_after_commit["on"] = False
            kept = await cancelled.refresh(include_messages=True)
            assert kept.num_turns == 1  # the engine had finished: kept whole
            reply = kept.messages[-1]
            assert done.message.tool_calls  # tool_choice "required": the reply is calls
            assert [c.name for c in reply.tool_calls] == [c.name for c in done.message.tool_calls]
            assert [c.arguments for c in reply.tool_calls] == [c.arguments for c in done.message.tool_calls]
            assert reply.content == done.message.content
            for s in (base, plain, cancelled):
                await s.close()

    try:
        run(body(), timeout=200)
    finally:
        aeng.shutdown()


def test_a_cancelled_long_turn_restarts_the_idle_clock() -> None:
    aeng = make_engine(num_blocks=256, max_model_len=2048)

    async def body() -> None:
        async with serving(aeng, expiry_interval=0.05) as (handle, client):
            s = await client.create_session([SYSTEM], ttl_seconds=1.0)
            try:  # a turn longer than the TTL, ended by the client's deadline
                await s.run_turn([USER], max_tokens=1500, ignore_eos=True, temperature=0, timeout=1.3)
            except grpc.aio.AioRpcError as e:
                assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await asyncio.sleep(0.3)
            info = await s.refresh()  # NOT_FOUND before: expired within one tick of the cancel
            assert info.num_turns == 0 and not info.busy
            await s.close()

    try:
        run(body(), timeout=120)
    finally:
        aeng.shutdown()
