"""The gRPC service on loopback: status codes for bad input, API keys, the bounded queue, cancelling a
turn mid-stream (rolled back, nothing leaks), closing a session during a turn, TTL expiry, graceful
shutdown, stateless Generate, raw-token sessions, Health / ListModels / ListSessions, and `agentserve
serve` as a process (SIGTERM)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import grpc
import pytest

from agentserve.adapters.client import AgentClient
from agentserve.service import agent_pb2 as pb
from agentserve.service.serve import running_server
from conftest_grpc import SYSTEM, TOOLS, make_engine, model_path, reference, run, serving

Code = grpc.StatusCode
USER = [{"role": "user", "content": "Hello there."}]


@pytest.fixture(scope="module")
def aeng():  # type: ignore[no-untyped-def]
    engine = make_engine(max_model_len=512, num_blocks=256)
    yield engine
    engine.shutdown()


async def _code(coro: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await coro
    return err.value.code(), err.value.details() or ""


async def _turn_code(session: Any, messages: Any, **kw: Any) -> tuple[grpc.StatusCode, str]:
    return await _code(session.run_turn(messages, **kw))


def test_bad_input_gets_the_right_status_and_the_session_keeps_working(aeng) -> None:  # type: ignore[no-untyped-def]
    async def body() -> None:
        async with serving(aeng) as (handle, client):
            c = client
            # CreateSession
            assert await _code(c.create_session([{"role": "wizard", "content": "hi"}])) == (
                Code.INVALID_ARGUMENT, "messages[0].role 'wizard' is not one of system, user, assistant, tool")
            code, msg = await _code(c.create_session([{"role": "user", "content": "x", "tool_calls": [
                {"id": "1", "function": {"name": "f", "arguments": "{}"}}]}]))
            assert code == Code.INVALID_ARGUMENT and "only assistant messages carry tool_calls" in msg
            code, msg = await _code(c.create_session([{"role": "assistant", "tool_calls": [
                {"id": "1", "function": {"name": "get_weather", "arguments": "{not json"}}]}], tools=TOOLS))
            assert code == Code.INVALID_ARGUMENT and "arguments is not valid JSON" in msg
            code, msg = await _code(c.create_session([{"role": "user", "content": ""}]))
            assert code == Code.INVALID_ARGUMENT and "has no content" in msg
            code, msg = await _code(c.create_session([SYSTEM], tools=[pb.Tool(name="t", parameters_json="[1, 2")]))
            assert code == Code.INVALID_ARGUMENT and "parameters_json is not valid JSON" in msg
            code, msg = await _code(c.create_session([{"role": "user", "content": "x", "token_ids": [1, 2]}]))
            assert code == Code.INVALID_ARGUMENT and "raw-token" in msg
            code, msg = await _code(c.create_session([{"role": "user", "token_ids": [1, 10**6]}], raw_tokens=True))
            assert code == Code.INVALID_ARGUMENT and "token_ids must be integers" in msg
            code, msg = await _code(c.create_session([SYSTEM], model="some-other-model"))
            assert code == Code.NOT_FOUND and "some-other-model" in msg
            code, msg = await _code(c.create_session([SYSTEM], adapter="no-such-adapter"))
            assert code == Code.NOT_FOUND and "no-such-adapter" in msg
            code, msg = await _code(c.create_session([{"role": "user", "content": "word " * 600}]))
            assert code == Code.INVALID_ARGUMENT and "max_model_len" in msg

            s = await c.create_session([SYSTEM], tools=TOOLS)
            # Turn
            code, msg = await _turn_code(s, [{"role": "robot", "content": "beep"}])
            assert code == Code.INVALID_ARGUMENT and "messages[0].role 'robot'" in msg
            code, msg = await _turn_code(s, [{"role": "tool", "content": "r", "tool_calls": [
                {"id": "1", "function": {"name": "get_weather", "arguments": "{}"}}]}])
            assert code == Code.INVALID_ARGUMENT and "tool_calls" in msg
            code, msg = await _turn_code(s, [{"role": "user", "content": "long " * 700}], max_tokens=4)
            assert code == Code.INVALID_ARGUMENT and "max_model_len" in msg
            code, msg = await _turn_code(s, USER, max_tokens=500)
            assert code == Code.INVALID_ARGUMENT and "exceeds max_model_len" in msg
            code, msg = await _turn_code(s, USER, top_p=2.0)
            assert code == Code.INVALID_ARGUMENT and "top_p" in msg
            code, msg = await _turn_code(s, USER, tool_choice="launch_rocket")
            assert code == Code.INVALID_ARGUMENT and "launch_rocket" in msg
            code, msg = await _turn_code(s, USER, response_format="xml")
            assert code == Code.INVALID_ARGUMENT and "response_format.type 'xml'" in msg
            code, msg = await _turn_code(s, USER, response_format={"type": "json_schema", "json_schema": "{oops"})
            assert code == Code.INVALID_ARGUMENT and "json_schema" in msg
            code, msg = await _turn_code(s, [{"role": "user", "content": "x", "token_ids": [5]}])
            assert code == Code.INVALID_ARGUMENT and "raw-token" in msg
            bad_schema = {"type": "json_schema", "json_schema": {"type": "object", "not": {"required": ["a"]}}}
            code, msg = await _turn_code(s, USER, response_format=bad_schema, max_tokens=4)
            assert code == Code.INVALID_ARGUMENT and "not" in msg
            # nothing above changed the session
            info = await s.refresh()
            assert info.num_turns == 0 and not info.busy and info.state == pb.SESSION_STATE_NEW
            ok = await s.run_turn(USER, max_tokens=4, temperature=0)
            assert ok.done.finish_reason in ("length", "stop", "tool_calls")
            code, msg = await _turn_code(s, [], max_tokens=4)
            assert code == Code.INVALID_ARGUMENT and "no new messages" in msg

            # a second turn while one is running
            slow = asyncio.ensure_future(s.run_turn([{"role": "user", "content": "Go on."}], max_tokens=120,
                                                    ignore_eos=True, tool_choice="none"))
            while not (await s.refresh()).busy:
                assert not slow.done(), slow.exception()
                await asyncio.sleep(0.005)
            code, msg = await _turn_code(s, USER, max_tokens=4)
            assert code == Code.FAILED_PRECONDITION and "already has a turn in flight" in msg
            code, msg = await _code(s.fork())
            assert code == Code.FAILED_PRECONDITION
            await slow

            # unknown and closed sessions
            ghost = c.session("sess-does-not-exist")
            for coro in (ghost.refresh(), ghost.run_turn(USER), ghost.fork(), ghost.close()):
                code, msg = await _code(coro)
                assert code == Code.NOT_FOUND and "sess-does-not-exist" in msg
            closed = await s.close()
            assert closed.state == pb.SESSION_STATE_CLOSED and closed.num_pages == 0
            for coro in (s.refresh(), s.run_turn(USER), s.fork(), s.close()):
                assert (await _code(coro))[0] == Code.NOT_FOUND

            # Generate
            code, msg = await _code(c.generate_done())
            assert code == Code.INVALID_ARGUMENT and "exactly one of prompt" in msg
            code, msg = await _code(c.generate_done("hi", prompt_token_ids=[1, 2]))
            assert code == Code.INVALID_ARGUMENT
            code, msg = await _code(c.generate_done(prompt_token_ids=[1, 2], model="nope"))
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
            assert (await _code(s.refresh()))[0] == Code.NOT_FOUND
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
            assert (await _code(short.refresh()))[0] == Code.NOT_FOUND
            assert (await keep.refresh()).state == pb.SESSION_STATE_NEW
            assert handle.store.stats.expired == 1
            await keep.close()

    run(body())


def test_queue_full_is_resource_exhausted() -> None:
    aeng = make_engine(max_waiting=2, max_model_len=512, num_blocks=128)

    async def body() -> None:
        async with serving(aeng) as (handle, client):
            s = await client.create_session([SYSTEM])
            long = [asyncio.ensure_future(client.generate_done(prompt_token_ids=[5, 6, 7], max_tokens=300,
                                                               ignore_eos=True)) for _ in range(2)]
            while aeng.num_pending < 2:
                await asyncio.sleep(0.005)
            code, msg = await _code(client.generate_done(prompt_token_ids=[5, 6], max_tokens=2))
            assert code == Code.RESOURCE_EXHAUSTED and "limit 2" in msg
            code, msg = await _turn_code(s, USER, max_tokens=2)
            assert code == Code.RESOURCE_EXHAUSTED
            info = await s.refresh()
            assert not info.busy and info.num_turns == 0  # the refused turn left no trace
            await asyncio.gather(*long)
            assert (await s.run_turn(USER, max_tokens=2)).done.usage.completion_tokens == 2
            await s.close()

    try:
        run(body())
    finally:
        aeng.shutdown()


def test_api_key_is_required_on_every_rpc(aeng) -> None:  # type: ignore[no-untyped-def]
    async def body() -> None:
        async with serving(aeng, api_key="sekret") as (handle, good):
            bad = AgentClient(handle.address, api_key="wrong")
            anon = AgentClient(handle.address)
            try:
                for c in (bad, anon):
                    for coro in (c.health(), c.create_session([SYSTEM]), c.list_sessions(),
                                 c.generate_done(prompt_token_ids=[1, 2], max_tokens=2)):
                        code, msg = await _code(coro)
                        assert code == Code.UNAUTHENTICATED and "API key" in msg
                assert (await good.health()).status == pb.HealthResponse.SERVING
                s = await good.create_session([SYSTEM])
                assert (await s.run_turn(USER, max_tokens=2)).done.usage.completion_tokens == 2
                # the x-api-key spelling works as well
                stub = good.stub
                resp = await stub.ListSessions(pb.ListSessionsRequest(), metadata=(("x-api-key", "sekret"),))
                assert [x.session_id for x in resp.sessions] == [s.id]
                await s.close()
            finally:
                await bad.close()
                await anon.close()

    run(body())


def test_generate_health_models_and_raw_token_sessions(aeng) -> None:  # type: ignore[no-untyped-def]
    async def body() -> None:
        async with serving(aeng) as (handle, client):
            e = aeng.engine
            models = await client.list_models()
            assert [m.id for m in models] == [e.model_name] and models[0].has_chat_template
            assert models[0].max_model_len == 512 and models[0].vocab_size == e.arch.vocab_size
            h = await client.health()
            assert h.status == pb.HealthResponse.SERVING and h.kv_pages_total == e.pool.num_blocks
            assert h.swap_slots_total == handle.store.num_swap_slots > 0

            # stateless Generate: text, token ids, chat messages
            texts, done = [], None
            prompt = "The weather today is sunny in Paris, cloudy in Oslo and raining in London. " * 2
            async for ev in client.generate(prompt, max_tokens=8, temperature=0, return_token_ids=True):
                if ev.HasField("text"):
                    texts.append(ev.text.text)
                else:
                    done = ev.done
            assert done is not None and "".join(texts) == done.text and len(done.token_ids) == 8
            ids = e.encode(prompt)
            assert done.usage.prompt_tokens == len(ids) > 16
            assert reference([ids], 8) == [list(done.token_ids)]
            d2 = await client.generate_done(prompt_token_ids=ids, max_tokens=8, temperature=0)
            assert list(d2.token_ids) == list(done.token_ids) and d2.usage.cached_tokens > 0
            d3 = await client.generate_done(messages=[SYSTEM] + USER, max_tokens=5, temperature=0)
            assert d3.usage.completion_tokens == 5

            # a raw-token session: messages are token ids, appended verbatim
            raw = await client.create_session([{"role": "system", "token_ids": list(range(10, 60))}], raw_tokens=True)
            assert raw.info.raw_tokens and raw.info.num_tokens == 50
            t1 = await raw.run_turn([{"role": "user", "token_ids": [70, 71, 72]}], max_tokens=5, temperature=0,
                                    return_token_ids=True)
            assert list(t1.done.prompt_token_ids) == list(range(10, 60)) + [70, 71, 72]
            t2 = await raw.run_turn([{"role": "tool", "token_ids": list(range(100, 140))}], max_tokens=5,
                                    temperature=0, return_token_ids=True)
            assert list(t2.done.prompt_token_ids) == list(t1.done.prompt_token_ids) + t1.token_ids + list(range(100, 140))
            assert t2.done.usage.prefilled_tokens == 40 + 1 and t2.done.usage.cached_tokens == 53 + 5 - 1
            assert reference([list(t1.done.prompt_token_ids), list(t2.done.prompt_token_ids)], 5) == [
                t1.token_ids, t2.token_ids]

            listed = await client.list_sessions()
            assert [x.session_id for x in listed] == [raw.id] and listed[0].num_turns == 2
            h = await client.health()
            assert h.num_sessions == 1 and h.sessions_resident == 1 and h.kv_pages_used > 0
            await raw.close()

    run(body())


def test_graceful_shutdown_cancels_in_flight_turns_cleanly() -> None:
    aeng = make_engine(max_model_len=1024, num_blocks=256)

    async def body() -> None:
        started = asyncio.Event()
        outcome: dict[str, Any] = {}
        async with running_server(aeng.engine.config, async_engine=aeng, grace=0.2) as handle:
            client = AgentClient(handle.address)  # outlives the server
            s = await client.create_session([SYSTEM])

            async def long_turn() -> None:
                try:
                    async for _ in s.turn(USER, max_tokens=600, ignore_eos=True):
                        started.set()
                    outcome["done"] = True
                except grpc.aio.AioRpcError as e:
                    outcome["code"] = e.code()

            task = asyncio.ensure_future(long_turn())
            await started.wait()
        # the server is gone: the turn was cancelled (or finished) and everything is released
        await asyncio.wait_for(task, 10)
        await client.close()
        assert outcome.get("done") or outcome.get("code") in (Code.CANCELLED, Code.UNAVAILABLE), outcome
        assert not aeng.engine.has_unfinished()
        aeng.engine.pool.check_all_free()

    try:
        run(body())
    finally:
        aeng.shutdown()


def test_grpc_and_http_share_one_process(aeng) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("agentserve.adapters.openai.app")
    import httpx

    async def body() -> None:
        async with serving(aeng, http_port=0) as (handle, client):
            assert handle.http_port
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{handle.http_port}") as http:
                r = await http.get("/v1/models")
                assert r.status_code == 200 and r.json()["data"][0]["id"] == aeng.engine.model_name
                s = await client.create_session([SYSTEM])
                await s.run_turn(USER, max_tokens=3)
                metrics = (await http.get("/metrics")).text
                assert "resident" in metrics
                await s.close()

    run(body())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_agentserve_serve_process_stops_on_sigterm() -> None:
    port = _free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "agentserve.cli", "serve", "--model", model_path("qwen2"),
                             "--grpc-port", str(port), "--device", "cpu", "--num-blocks", "128",
                             "--max-model-len", "512"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    try:
        async def body() -> None:
            async with AgentClient(f"127.0.0.1:{port}") as client:
                deadline = time.monotonic() + 90
                while True:
                    try:
                        h = await client.health()
                        break
                    except grpc.aio.AioRpcError:
                        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                        assert time.monotonic() < deadline, "the server did not come up"
                        await asyncio.sleep(0.2)
                assert h.status == pb.HealthResponse.SERVING
                s = await client.create_session([SYSTEM])
                assert (await s.run_turn(USER, max_tokens=3)).done.usage.completion_tokens == 3

        run(body(), timeout=120)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert "gRPC on 127.0.0.1:" in out and "shutting down" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


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
            # the same over stateless Generate with messages
            events = [ev async for ev in client.generate(messages=[SYSTEM, {"role": "user", "content": "Weather in Paris?"}],
                                                         tools=TOOLS, tool_choice="required", max_tokens=80,
                                                         temperature=0)]
            g_deltas = [e.tool_call for e in events if e.HasField("tool_call")]
            assert [(d.index, d.name, d.arguments_delta) for d in g_deltas][:1] == [(0, deltas[0].name, deltas[0].arguments_delta)]
            await s.close()

    run(body())
