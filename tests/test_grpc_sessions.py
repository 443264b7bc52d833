"""The gRPC session methods on loopback (CreateSession, Turn, ForkSession, GetSession, CloseSession):
status codes for bad input (and Generate's), cancelling a turn mid-stream (rolled back, nothing
leaks), closing a session during a turn, TTL expiry, tool-call deltas that reassemble to the final
call (Turn and Generate), replies ended by their constraint completing (no EOS) kept whole, an
output constraint that contradicts allowed_token_ids / bad_words (INVALID_ARGUMENT, failing alone)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from typing import Any

import grpc
import pytest

from agentserve.service import agent_pb2 as pb
from conftest_grpc import SYSTEM, TOOLS, USER, make_engine, reference, rpc_status, run, serving, turn_status

Code = grpc.StatusCode


@pytest.fixture(scope="module")
def aeng():  # type: ignore[no-untyped-def]
    engine = make_engine(max_model_len=512, num_blocks=256)
    yield engine
    engine.shutdown()


def test_bad_input_gets_the_right_status_and_the_session_keeps_working(aeng) -> None:  # type: ignore[no-untyped-def]
    async def body() -> None:
        async with serving(aeng) as (handle, client):
            c = client
            # CreateSession
            assert await rpc_status(c.create_session([{"role": "wizard", "content": "hi"}])) == (
                Code.INVALID_ARGUMENT, "messages[0].role 'wizard' is not one of system, user, assistant, tool")
            code, msg = await rpc_status(c.create_session([{"role": "user", "content": "x", "tool_calls": [
                {"id": "1", "function": {"name": "f", "arguments": "{}"}}]}]))
            assert code == Code.INVALID_ARGUMENT and "only assistant messages carry tool_calls" in msg
            code, msg = await rpc_status(c.create_session([{"role": "assistant", "tool_calls": [
                {"id": "1", "function": {"name": "get_weather", "arguments": "{not json"}}]}], tools=TOOLS))
            assert code == Code.INVALID_ARGUMENT and "arguments is not valid JSON" in msg
            code, msg = await rpc_status(c.create_session([{"role": "user", "content": ""}]))
            assert code == Code.INVALID_ARGUMENT and "has no content" in msg
            code, msg = await rpc_status(c.create_session([SYSTEM], tools=[pb.Tool(name="t", parameters_json="[1, 2")]))
            assert code == Code.INVALID_ARGUMENT and "parameters_json is not valid JSON" in msg
            code, msg = await rpc_status(c.create_session([{"role": "user", "content": "x", "token_ids": [1, 2]}]))
            assert code == Code.INVALID_ARGUMENT and "raw-token" in msg
            code, msg = await rpc_status(c.create_session([{"role": "user", "token_ids": [1, 10**6]}], raw_tokens=True))
            assert code == Code.INVALID_ARGUMENT and "token_ids must be integers" in msg
            code, msg = await rpc_status(c.create_session([SYSTEM], model="some-other-model"))
            assert code == Code.NOT_FOUND and "some-other-model" in msg
            code, msg = await rpc_status(c.create_session([SYSTEM], adapter="no-such-adapter"))
            assert code == Code.NOT_FOUND and "no-such-adapter" in msg
            code, msg = await rpc_status(c.create_session([{"role": "user", "content": "word " * 600}]))
            assert code == Code.INVALID_ARGUMENT and "max_model_len" in msg

            s = await c.create_session([SYSTEM], tools=TOOLS)
            # Turn
            code, msg = await turn_status(s, [{"role": "robot", "content": "beep"}])
            assert code == Code.INVALID_ARGUMENT and "messages[0].role 'robot'" in msg
            code, msg = await turn_status(s, [{"role": "tool", "content": "r", "tool_calls": [
                {"id": "1", "function": {"name": "get_weather", "arguments": "{}"}}]}])
            assert code == Code.INVALID_ARGUMENT and "tool_calls" in msg
            code, msg = await turn_status(s, [{"role": "user", "content": "long " * 700}], max_tokens=4)
            assert code == Code.INVALID_ARGUMENT and "max_model_len" in msg
            code, msg = await turn_status(s, USER, max_tokens=500)
            assert code == Code.INVALID_ARGUMENT and "exceeds max_model_len" in msg
            code, msg = await turn_status(s, USER, top_p=2.0)
            assert code == Code.INVALID_ARGUMENT and "top_p" in msg
            code, msg = await turn_status(s, USER, tool_choice="launch_rocket")
            assert code == Code.INVALID_ARGUMENT and "launch_rocket" in msg
            code, msg = await turn_status(s, USER, response_format="xml")
            assert code == Code.INVALID_ARGUMENT and "response_format.type 'xml'" in msg
            code, msg = await turn_status(s, USER, response_format={"type": "json_schema", "json_schema": "{oops"})
            assert code == Code.INVALID_ARGUMENT and "json_schema" in msg
            code, msg = await turn_status(s, [{"role": "user", "content": "x", "token_ids": [5]}])
            assert code == Code.INVALID_ARGUMENT and "raw-token" in msg
            bad_schema = {"type": "json_schema", "json_schema": {"type": "object", "properties": {  # no positive form
                "a": {"type": "string", "not": {"enum": ["x"]}}}}}
            code, msg = await turn_status(s, USER, response_format=bad_schema, max_tokens=4)
            assert code == Code.INVALID_ARGUMENT and "not" in msg
            # nothing above changed the session
            info = await s.refresh()
            assert info.num_turns == 0 and not info.busy and info.state == pb.SESSION_STATE_NEW
            ok = await s.run_turn(USER, max_tokens=4, temperature=0)
            assert ok.done.finish_reason in ("length", "stop", "tool_calls")
            code, msg = await turn_status(s, [], max_tokens=4)
            assert code == Code.INVALID_ARGUMENT and "no new messages" in msg

            # a second turn while one is running
            slow = asyncio.ensure_future(s.run_turn([{"role": "user", "content": "Go on."}], max_tokens=120,
                                                    ignore_eos=True, tool_choice="none"))
            while not (await s.refresh()).busy:
                assert not slow.done(), slow.exception()
                await asyncio.sleep(0.005)
            code, msg = await turn_status(s, USER, max_tokens=4)
            assert code == Code.FAILED_PRECONDITION and "already has a turn in flight" in msg
            code, msg = await rpc_status(s.fork())
            assert code == Code.FAILED_PRECONDITION
            await slow

            # unknown and closed sessions
            ghost = c.session("sess-does-not-exist")
            for coro in (ghost.refresh(), ghost.run_turn(USER), ghost.fork(), ghost.close()):
                code, msg = await rpc_status(coro)
                assert code == Code.NOT_FOUND and "sess-does-not-exist" in msg
            closed = await s.close()
            assert closed.state == pb.SESSION_STATE_CLOSED and closed.num_pages == 0
            for coro in (s.refresh(), s.run_turn(USER), s.fork(), s.close()):
                assert (await rpc_status(coro))[0] == Code.NOT_FOUND

            # Generate
            code, msg = await rpc_status(c.generate_done())
            assert code == Code.INVALID_ARGUMENT and "exactly one of prompt" in msg
            code, msg = await rpc_status(c.generate_done("hi", prompt_token_ids=[1, 2]))
            assert code == Code.INVALID_ARGUMENT
            code, msg = await rpc_status(c.generate_done(prompt_token_ids=[1, 2], model="nope"))
            assert code == Code.NOT_FOUND

    run(body())


def test_cancel_mid_stream_rolls_the_turn_back_and_leaks_nothing(aeng) -> None:  # type: ignore[no-untyped-def]
    pool = aeng.engine.pool

    async def body() -> None:
        async with serving(aeng) as (handle, client):
            s = await client.create_session([SYSTEM], tools=TOOLS)
            first = await s.run_turn(USER, max_tokens=6, temperature=0, return_token_ids=True)
            before = await s.refresh(include_messages=True, include_token_ids=True)
            used = pool.num_used_blocks
            texts = 0
            async with contextlib.aclosing(s.turn([{"role": "user", "content": "Write a long story."}],
                                                  max_tokens=150, ignore_eos=True, tool_choice="none",
                                                  temperature=0)) as events:
                async for ev in events:
                    texts += ev.HasField("text")
                    if texts == 3:
                        break  # the client goes away mid-stream
            for _ in range(400):
                info = await s.refresh(include_messages=True, include_token_ids=True)
                if not info.busy:
                    break
                await asyncio.sleep(0.005)
            # rolled back: the same tokens, messages, turns and pages as before the turn
            assert not info.busy and info.num_turns == before.num_turns == 1
            assert list(info.token_ids) == list(before.token_ids) and list(info.messages) == list(before.messages)
            assert info.state == pb.SESSION_STATE_RESIDENT and info.num_pages == before.num_pages
            assert handle.store.stats.rolled_back == 1
            assert pool.num_used_blocks == used and not aeng.engine.has_unfinished()
            # and the session continues exactly
            nxt = await s.run_turn([{"role": "user", "content": "Shorter, please."}], max_tokens=6, temperature=0,
                                   return_token_ids=True)
            assert list(nxt.done.prompt_token_ids)[:len(before.token_ids)] == list(before.token_ids)
            assert reference([list(nxt.done.prompt_token_ids)], 6, tools=TOOLS) == [nxt.token_ids]
            assert first.done.usage.completion_tokens == 6
            await s.close()
        pool.check_all_free()

    run(body())


def test_close_during_a_turn_cancels_it(aeng) -> None:  # type: ignore[no-untyped-def]
    async def body() -> None:
        async with serving(aeng) as (handle, client):
            s = await client.create_session([SYSTEM])
            await s.run_turn(USER, max_tokens=4)
            started = asyncio.Event()

            async def long_turn() -> Any:
                async for ev in s.turn([{"role": "user", "content": "Go on."}], max_tokens=400, ignore_eos=True):
                    started.set()
                return None

            task = asyncio.ensure_future(long_turn())
            await started.wait()
            closed = await client.session(s.id).close()
            assert closed.state == pb.SESSION_STATE_CLOSED
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await task
            assert err.value.code() == Code.CANCELLED and "closed during the turn" in (err.value.details() or "")
            assert (await rpc_status(s.refresh()))[0] == Code.NOT_FOUND
            assert len(handle.store) == 0
        aeng.engine.pool.check_all_free()

    run(body())


def test_ttl_expiry_closes_idle_sessions(aeng) -> None:  # type: ignore[no-untyped-def]
    async def body() -> None:
        async with serving(aeng, expiry_interval=0.05) as (handle, client):
            short = await client.create_session([SYSTEM], ttl_seconds=0.3)
            keep = await client.create_session([SYSTEM], ttl_seconds=60)
            await short.run_turn(USER, max_tokens=4)
            assert short.info.expires_at > time.time()
            await asyncio.sleep(0.8)
            assert (await rpc_status(short.refresh()))[0] == Code.NOT_FOUND
            assert (await keep.refresh()).state == pb.SESSION_STATE_NEW
            assert handle.store.stats.expired == 1
            await keep.close()

    run(body())


def test_a_fork_restarts_the_parents_ttl_on_the_clock_sessioninfo_shows(aeng) -> None:  # type: ignore[no-untyped-def]
    """Forking is activity on the parent: its TTL restarts, and its expires_at says so (it stayed at the old
    time, in the past for an open session)."""
    async def body() -> None:
        async with serving(aeng, expiry_interval=0.05) as (_, client):
            parent = await client.create_session([SYSTEM], ttl_seconds=1.0)
            created = parent.info.expires_at
            await asyncio.sleep(0.6)
            await parent.fork()
            info = await parent.refresh()
            assert info.expires_at >= created + 0.5 and info.expires_at > time.time() + 0.8
            await asyncio.sleep(0.6)  # past the first expiry: still open, as expires_at said
            assert (await parent.refresh()).state == pb.SESSION_STATE_NEW
            await parent.close()

    run(body())


def test_close_during_a_turn_returns_the_final_state_not_busy(aeng) -> None:  # type: ignore[no-untyped-def]
    """CloseSession returns after the turn in flight was cancelled and rolled back: its SessionInfo (the
    final state, CLOSED) is not busy and holds no pages."""
    async def body() -> None:
        async with serving(aeng) as (_, client):
            session = await client.create_session([SYSTEM])
            events = session.turn(USER, max_tokens=400, temperature=0.0, ignore_eos=True)
            await events.__anext__()  # the turn is running
            closed = await client.stub.CloseSession(pb.CloseSessionRequest(session_id=session.id),
                                                    metadata=client.metadata)
            assert closed.session.state == pb.SESSION_STATE_CLOSED
            assert (closed.session.busy, closed.session.num_pages) == (False, 0)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in events:
                    pass
            assert err.value.code() == Code.CANCELLED
        aeng.engine.pool.check_all_free()

    run(body())


def test_tool_call_deltas_reassemble_to_the_final_call(aeng) -> None:  # type: ignore[no-untyped-def]
    async def body() -> None:
        async with serving(aeng) as (handle, client):
            s = await client.create_session([SYSTEM, {"role": "user", "content": "Weather in Paris?"}], tools=TOOLS)
            r = await s.run_turn(max_tokens=80, temperature=0, tool_choice="required")
            deltas = [e.tool_call for e in r.events if e.HasField("tool_call")]
            assert deltas and deltas[0].name in ("get_weather", "read_file") and deltas[0].id
            assert r.text == ""  # "required": the reply is the call, no free text
            streamed = "".join(d.arguments_delta for d in deltas if d.index == 0)
            if r.done.message.tool_calls:  # complete within max_tokens
                call = r.done.message.tool_calls[0]
                assert (call.name, call.id, call.arguments) == (deltas[0].name, deltas[0].id, streamed)
                # GetSession shows the reply as TurnDone did (it showed the raw call text as content).
                reply = (await s.refresh(include_messages=True)).messages[-1]
                assert (reply.role, reply.content) == ("assistant", r.done.message.content)
                assert [(c.id, c.name, c.arguments) for c in reply.tool_calls] == \
                    [(c.id, c.name, c.arguments) for c in r.done.message.tool_calls]
            # the same over stateless Generate with messages
            events = [ev async for ev in client.generate(messages=[SYSTEM, {"role": "user", "content": "Weather in Paris?"}],
                                                         tools=TOOLS, tool_choice="required", max_tokens=80,
                                                         temperature=0)]
            g_deltas = [e.tool_call for e in events if e.HasField("tool_call")]
            assert [(d.index, d.name, d.arguments_delta) for d in g_deltas][:1] == [(0, deltas[0].name, deltas[0].arguments_delta)]
            await s.close()

    run(body())


def test_a_reply_ended_by_its_constraint_keeps_its_last_token(aeng) -> None:  # type: ignore[no-untyped-def]
    # A regex output ends when the regex can take no more tokens, with no EOS sampled (finish
    # "stop", no stop string or id): its last token is the reply's, in what the client gets (also
    # when tools are declared and the reply is parsed for calls) and in the session's history.
    regex = {"type": "regex", "regex": "(yes|no) sir"}

    async def body() -> None:
        async with serving(aeng) as (handle, client):
            for tools in ((), TOOLS):
                s = await client.create_session([SYSTEM], tools=tools)
                r = await s.run_turn(USER, max_tokens=20, temperature=0, response_format=regex, return_token_ids=True)
                assert r.done.finish_reason == "stop" and re.fullmatch("(yes|no) sir", r.done.message.content), (
                    tools, r.done.message.content)
                assert r.text == r.done.message.content
                info = await s.refresh(include_messages=True, include_token_ids=True)
                assert info.messages[-1].content == r.done.message.content
                assert list(info.token_ids)[-len(r.token_ids):] == r.token_ids
                nxt = await s.run_turn([{"role": "user", "content": "ok"}], max_tokens=2, temperature=0,
                                       return_token_ids=True)
                assert list(nxt.done.prompt_token_ids)[:len(info.token_ids)] == list(info.token_ids)
                await s.close()
                g = await client.generate_done(messages=[SYSTEM, *USER], tools=tools, max_tokens=20, temperature=0,
                                               response_format=regex)
                assert re.fullmatch("(yes|no) sir", g.text), (tools, g.text)

    run(body())


def test_a_constraint_that_contradicts_the_token_restrictions_is_invalid_argument(aeng) -> None:  # type: ignore[no-untyped-def]
    # The constraint allows only "yes", the request's own allowed_token_ids / bad_words forbid it:
    # no token can be sampled. That is the client's contradiction (INVALID_ARGUMENT naming the fields),
    # not a server fault; a request beside it completes and the session is left as it was.
    choice = {"type": "choice", "choice": ["yes"]}
    cases: list[dict[str, Any]] = [dict(allowed_token_ids=[3]), dict(bad_words=["yes"])]

    async def body() -> None:
        async with serving(aeng) as (handle, client):
            s = await client.create_session([SYSTEM])
            before = await s.refresh()
            for kw in cases:
                field = next(iter(kw))
                side = client.generate_done(prompt_token_ids=list(range(3, 20)), max_tokens=6, temperature=0,
                                            ignore_eos=True)
                (code, msg), done = await asyncio.gather(
                    rpc_status(client.generate_done("hello", max_tokens=8, temperature=0, response_format=choice,
                                                    **kw)), side)
                assert code == Code.INVALID_ARGUMENT and field in msg and "output constraint" in msg, (code, msg)
                assert len(done.token_ids) == 6
                code, msg = await turn_status(s, USER, max_tokens=8, temperature=0, response_format=choice, **kw)
                assert code == Code.INVALID_ARGUMENT and field in msg and "output constraint" in msg, (code, msg)
                after = await s.refresh()
                assert (after.num_turns, after.num_kv_tokens, after.busy) == (before.num_turns, before.num_kv_tokens,
                                                                              False)
            await s.close()

    run(body())
