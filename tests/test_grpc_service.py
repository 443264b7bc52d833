"""The gRPC service methods and the server on loopback: stateless Generate, Health, ListModels,
ListSessions, raw-token sessions, API keys on every RPC, the bounded queue, graceful shutdown, gRPC
and HTTP in one process, and `agentserve serve` as a process (SIGTERM)."""

from __future__ import annotations

import asyncio
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
from conftest_grpc import SYSTEM, USER, make_engine, model_path, reference, rpc_status, run, serving, turn_status

Code = grpc.StatusCode


@pytest.fixture(scope="module")
def aeng():  # type: ignore[no-untyped-def]
    engine = make_engine(max_model_len=512, num_blocks=256)
    yield engine
    engine.shutdown()


def test_queue_full_is_resource_exhausted() -> None:
    aeng = make_engine(max_waiting=2, max_model_len=512, num_blocks=128)

    async def body() -> None:
        async with serving(aeng) as (handle, client):
            s = await client.create_session([SYSTEM])
            long = [asyncio.ensure_future(client.generate_done(prompt_token_ids=[5, 6, 7], max_tokens=300,
                                                               ignore_eos=True)) for _ in range(2)]
            while aeng.num_pending < 2:
                await asyncio.sleep(0.005)
            code, msg = await rpc_status(client.generate_done(prompt_token_ids=[5, 6], max_tokens=2))
            assert code == Code.RESOURCE_EXHAUSTED and "limit 2" in msg
            code, msg = await turn_status(s, USER, max_tokens=2)
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
                        code, msg = await rpc_status(coro)
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
            forced = await client.generate_done(prompt_token_ids=ids, max_tokens=4, temperature=0,
                                                return_token_ids=True, logit_bias={42: 100.0})
            assert list(forced.token_ids) == [42] * 4  # logit_bias (map<int32, float>)
            with pytest.raises(grpc.aio.AioRpcError) as bad:
                await client.generate_done(prompt_token_ids=ids, max_tokens=4, logit_bias={-3: 1.0})
            assert bad.value.code() == Code.INVALID_ARGUMENT and "logit_bias" in (bad.value.details() or "")
            only = await client.generate_done(prompt_token_ids=ids, max_tokens=6, temperature=0, return_token_ids=True,
                                              allowed_token_ids=[42, 77])
            assert set(only.token_ids) <= {42, 77}  # allowed_token_ids (repeated int32, field 15)
            with pytest.raises(grpc.aio.AioRpcError) as bad:
                await client.generate_done(prompt_token_ids=ids, max_tokens=4, allowed_token_ids=[10**8])
            assert bad.value.code() == Code.INVALID_ARGUMENT and "allowed_token_ids" in (bad.value.details() or "")

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
