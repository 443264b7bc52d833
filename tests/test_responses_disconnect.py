"""Clients of /v1/responses that go away mid-reply leave nothing behind: a streamed response whose
client disconnects is rolled back and its session (a new one, or the fork a `store: false`
continuation runs on) is closed, so no session holds pages or counts against the tenant's session
limit until its TTL; the response it continued can still be continued on its session afterwards."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

from agentserve.config import EngineConfig
from agentserve.service.serve import ServerHandle, running_server
from agentserve.testing.tiny import tiny_model_cached

MODEL = "tiny-qwen2"


def _config() -> EngineConfig:
    return EngineConfig.from_kwargs(str(tiny_model_cached("qwen2")), device="cpu", num_blocks=256,
                                    served_model_name=MODEL, max_model_len=1024)


def _body(**kw: Any) -> dict[str, Any]:
    return {"model": MODEL, "input": "Tell me a long story.", "temperature": 0, **kw}


async def _drop_mid_stream(http: httpx.AsyncClient, body: dict[str, Any], events: int = 6) -> None:
    """Reads a few SSE events of a long streamed response, then closes the connection."""
    async with http.stream("POST", "/v1/responses", json=dict(body, stream=True)) as r:
        assert r.status_code == 200, await r.aread()
        seen = 0
        async for line in r.aiter_lines():
            seen += line.startswith("data: ")
            if seen >= events:
                return
    raise AssertionError("the response ended before the client left")


async def _settled(handle: ServerHandle, sessions: int, timeout: float = 10.0) -> None:
    """Waits until the engine is idle and `sessions` sessions are open (the cleanup after a
    disconnect runs after the connection closed)."""
    aeng, store = handle.async_engine, handle.store
    deadline = time.monotonic() + timeout
    while aeng.engine.has_unfinished() or len(store) != sessions:
        assert time.monotonic() < deadline, (f"{len(store)} sessions open (expected {sessions}); "
                                             f"requests: {list(aeng.engine.groups)}")
        await asyncio.sleep(0.02)


def test_dropped_streams_close_their_sessions() -> None:
    async def main() -> None:
        async with running_server(_config(), grpc_port=None, http_port=0) as handle:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{handle.http_port}", timeout=60) as http:
                long = _body(max_output_tokens=400, ignore_eos=True)
                # A new response (stored by default) whose client leaves mid-stream: nothing to keep.
                await _drop_mid_stream(http, long)
                await _settled(handle, sessions=0)
                # A stored response, then a `store: false` continuation of it dropped mid-stream: its
                # fork goes, the stored response's session stays, and it can still be continued there.
                first = (await http.post("/v1/responses", json=_body(max_output_tokens=4))).json()
                await _settled(handle, sessions=1)
                await _drop_mid_stream(http, dict(long, previous_response_id=first["id"], store=False,
                                                  input="Go on."))
                await _settled(handle, sessions=1)
                # Dropped twice more on the stored response's own session (store: true): rolled back each
                # time, and the next continuation still runs on that session (the whole earlier
                # conversation cached), not on a re-rendered copy.
                for _ in range(2):
                    await _drop_mid_stream(http, dict(long, previous_response_id=first["id"], input="Go on."))
                    await _settled(handle, sessions=1)
                r = await http.post("/v1/responses", json=_body(max_output_tokens=3, previous_response_id=first["id"],
                                                                input="Go on."))
                assert r.status_code == 200, r.text
                cached = r.json()["usage"]["input_tokens_details"]["cached_tokens"]
                assert cached >= first["usage"]["input_tokens"], r.json()["usage"]
                await _settled(handle, sessions=1)
                store = handle.store
                assert store.stats.rolled_back >= 4
                await store.close_all()
                await handle.async_engine.run(handle.engine.pool.check_all_free)

    asyncio.run(asyncio.wait_for(main(), 120))


def test_a_client_that_leaves_a_whole_response_stops_its_turn() -> None:
    """Without `stream`, a client that gives up (a timeout, a closed connection) stops the turn at
    once, as /v1/completions and /v1/chat/completions abort theirs: the engine does not generate the
    remaining tokens for nobody, and the rolled-back response's session is closed."""

    async def main() -> None:
        async with running_server(_config(), grpc_port=None, http_port=0) as handle:
            engine = handle.engine
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{handle.http_port}", timeout=60) as http:
                first = (await http.post("/v1/responses", json=_body(max_output_tokens=4))).json()
                for extra in ({}, {"previous_response_id": first["id"], "input": "Go on."}):
                    generated = engine.metrics.generation_tokens_total
                    post = asyncio.ensure_future(http.post("/v1/responses", json=_body(
                        max_output_tokens=900, ignore_eos=True, **extra)))
                    while engine.metrics.generation_tokens_total - generated < 8:  # decoding
                        await asyncio.sleep(0.005)
                    post.cancel()
                    await asyncio.gather(post, return_exceptions=True)
                    await _settled(handle, sessions=1, timeout=5)
                    assert engine.metrics.generation_tokens_total - generated < 600
                r = await http.post("/v1/responses", json=_body(max_output_tokens=3, previous_response_id=first["id"],
                                                                input="Go on."))
                assert r.status_code == 200, r.text
                assert r.json()["usage"]["input_tokens_details"]["cached_tokens"] >= first["usage"]["input_tokens"]
                await handle.store.close_all()
                await handle.async_engine.run(engine.pool.check_all_free)

    asyncio.run(asyncio.wait_for(main(), 120))
