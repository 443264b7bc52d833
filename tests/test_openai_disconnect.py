"""Clients that go away: 200 concurrent streaming requests, many dropped at random points (before the
first byte, mid-stream), plus non-streaming requests whose client gives up. The server stays up, keeps
answering, and once the engine is idle every KV page is free."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any, Iterator

import httpx
import pytest

from agentserve.adapters.openai.app import create_app
from agentserve.adapters.openai.metrics import parse_metrics
from agentserve.adapters.openai.server import ServerThread
from agentserve.config import EngineConfig
from agentserve.engine.async_engine import AsyncEngine
from agentserve.engine.engine import Engine
from agentserve.testing.tiny import tiny_model_cached

MODEL = "tiny-qwen3"


class Live:
    def __init__(self, aeng: AsyncEngine, server: ServerThread) -> None:
        self.aeng, self.server = aeng, server

    def run(self, fn: Any) -> Any:
        return self.aeng.call_soon(fn).result(timeout=30)

    def wait_idle(self, timeout: float = 30.0) -> float:
        start = time.monotonic()
        while self.run(self.aeng.engine.has_unfinished) or self.aeng.num_pending:
            assert time.monotonic() - start < timeout, (
                f"still busy: {len(self.aeng.engine.groups)} requests, {self.aeng.num_pending} streams")
            time.sleep(0.02)
        return time.monotonic() - start

    def check_all_free(self) -> None:
        self.run(self.aeng.engine.pool.check_all_free)


@pytest.fixture(scope="module")
def live() -> Iterator[Live]:
    path = tiny_model_cached("qwen3", max_position_embeddings=4096)
    config = EngineConfig.from_kwargs(str(path), device="cpu", num_blocks=4096, served_model_name=MODEL,
                                      max_model_len=4096, max_num_seqs=256)
    aeng = AsyncEngine(Engine(config))
    server = ServerThread(create_app(aeng, config)).start()
    yield Live(aeng, server)
    server.stop()
    aeng.shutdown()


def _body(i: int, max_tokens: int, stream: bool = True) -> dict[str, Any]:
    if i % 2:
        return {"model": MODEL, "prompt": f"Request number {i} says", "max_tokens": max_tokens, "stream": stream,
                "ignore_eos": True, "temperature": 0.8, "seed": i}
    return {"model": MODEL, "messages": [{"role": "system", "content": "You are a helpful agent."},
                                         {"role": "user", "content": f"Task {i}: report."}],
            "max_tokens": max_tokens, "stream": stream, "ignore_eos": True, "temperature": 0.8, "seed": i}


def _path(i: int) -> str:
    return "/v1/completions" if i % 2 else "/v1/chat/completions"


def test_200_concurrent_streams_with_random_disconnects(live: Live) -> None:
    rng = random.Random(0)
    n = 200
    max_tokens = 12
    # What each client does: read everything, drop after k events, or drop before any byte arrives.
    plans = [rng.choice(["full", "full", "drop_mid", "drop_mid", "drop_early"]) for _ in range(n)]
    drop_after = [rng.randint(1, max_tokens - 2) for _ in range(n)]
    outcome: dict[int, Any] = {}

    async def one(client: httpx.AsyncClient, i: int) -> None:
        plan = plans[i]
        if plan == "drop_early":
            task = asyncio.create_task(client.post(_path(i), json=_body(i, max_tokens)))
            await asyncio.sleep(rng.uniform(0.0, 0.05))
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, httpx.HTTPError):
                pass
            outcome[i] = "dropped"
            return
        async with client.stream("POST", _path(i), json=_body(i, max_tokens)) as r:
            assert r.status_code == 200, await r.aread()
            events = 0
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                events += 1
                if line == "data: [DONE]":
                    outcome[i] = events
                    return
                if plan == "drop_mid" and events >= drop_after[i]:
                    outcome[i] = "dropped"
                    return  # leaving the context closes the connection mid-stream
        outcome[i] = "no [DONE]"

    async def main() -> float:
        limits = httpx.Limits(max_connections=n + 10, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=live.server.url, timeout=120, limits=limits) as client:
            start = time.monotonic()
            await asyncio.gather(*(one(client, i) for i in range(n)))
            return time.monotonic() - start

    m = live.aeng.engine.metrics
    finished_before = m.requests_finished_total
    elapsed = asyncio.run(main())
    assert elapsed < 90, f"200 streams took {elapsed:.1f} s"
    full = [i for i in range(n) if plans[i] == "full"]
    assert all(isinstance(outcome[i], int) and outcome[i] >= 2 for i in full), \
        {i: outcome[i] for i in full if not isinstance(outcome[i], int)}
    # Aborted requests leave the engine quickly; then every page is free.
    live.wait_idle(timeout=30)
    live.check_all_free()
    finished = m.requests_finished_total - finished_before
    print(f"200 streams in {elapsed:.2f} s; {finished} ran to the end, {n - finished} were aborted")
    assert len(full) <= finished < n  # the dropped ones were (mostly) aborted, not run to the end
    # The server is still up and serving.
    r = httpx.post(live.server.url + "/v1/chat/completions", json=_body(0, 4, stream=False), timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    metrics = parse_metrics(httpx.get(live.server.url + "/metrics").text)
    assert metrics["agentserve_num_requests_running"] == 0
    live.wait_idle()
    live.check_all_free()


def test_disconnect_aborts_long_requests(live: Live) -> None:
    """A client that gives up on a long request (streaming or not) aborts it at once: the engine does
    not keep generating the remaining thousands of tokens."""
    # Long enough that no request can finish while the test sets up its disconnects, even on a fast
    # host path (at 480 tokens the non-streaming ones sometimes finished first under load).
    long_tokens = 3500

    async def main() -> None:
        async with httpx.AsyncClient(base_url=live.server.url, timeout=120) as client:
            tasks = [asyncio.create_task(client.post(_path(i), json=_body(i, long_tokens, stream=False)))
                     for i in range(4)]

            async def stream_then_drop(i: int) -> None:
                async with client.stream("POST", _path(i), json=_body(i, long_tokens)) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: "):
                            return

            await asyncio.gather(*(stream_then_drop(i) for i in range(4, 8)))
            # Wait until the non-streaming ones are running, then give up on them.
            deadline = time.monotonic() + 20
            while len(live.aeng.engine.groups) < 4 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert len(live.aeng.engine.groups) >= 4
            await asyncio.sleep(0.1)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    live.wait_idle()
    m = live.aeng.engine.metrics
    tokens_before, finished_before = m.generation_tokens_total, m.requests_finished_total
    asyncio.run(main())
    waited = live.wait_idle(timeout=10)
    live.check_all_free()
    # Finishing 8 x 480 tokens would take far longer than an abort, and none of them finished.
    assert waited < 5
    assert m.requests_finished_total == finished_before
    generated = m.generation_tokens_total - tokens_before
    assert 8 <= generated < 8 * long_tokens // 2, generated
