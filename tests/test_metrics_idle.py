"""Gauges are true when the server idles: /metrics and gRPC Health read the scheduler and the page
pool when asked, so after the last request finishes (and the engine stops stepping) they report 0
running, 0 waiting and every page free, not the state of the last step."""

from __future__ import annotations

import asyncio

import httpx

from agentserve.adapters.client import AgentClient
from agentserve.adapters.openai.metrics import parse_metrics
from agentserve.config import EngineConfig
from agentserve.service.serve import running_server
from agentserve.testing.tiny import tiny_model_cached


def test_gauges_report_idle_after_requests_finish() -> None:
    config = EngineConfig.from_kwargs(str(tiny_model_cached("qwen2")), device="cpu", num_blocks=256,
                                      served_model_name="tiny", max_model_len=512)

    async def main() -> None:
        async with running_server(config, grpc_port=0, http_port=0) as handle:
            assert handle.address is not None
            url = f"http://127.0.0.1:{handle.http_port}"
            async with httpx.AsyncClient(base_url=url, timeout=60) as http, AgentClient(handle.address) as grpc_client:
                body = {"model": "tiny", "prompt": "one two three four", "max_tokens": 6, "temperature": 0}
                busy_seen = False
                # Requests in flight: while they run, a scrape sees them (the gauges are not frozen at 0).
                tasks = [asyncio.create_task(http.post("/v1/completions", json={**body, "max_tokens": 24}))
                         for _ in range(4)]
                for _ in range(200):
                    health = await grpc_client.health()
                    if health.num_running + health.num_waiting > 0 and health.kv_pages_used > 0:
                        busy_seen = True
                        break
                    await asyncio.sleep(0.005)
                for r in await asyncio.gather(*tasks):
                    assert r.status_code == 200, r.text
                done = await grpc_client.generate_done("five six seven", max_tokens=5, temperature=0)
                assert done.usage.completion_tokens > 0
                assert busy_seen, "Health never saw the requests running"
                # The engine now idles (nothing left to step): the gauges must already say so.
                await asyncio.sleep(0.2)
                assert not handle.engine.has_unfinished()
                metrics = parse_metrics((await http.get("/metrics")).text)
                assert metrics["agentserve_num_requests_running"] == 0
                assert metrics["agentserve_num_requests_waiting"] == 0
                assert metrics["agentserve_kv_cache_pages_used"] == 0
                assert metrics["agentserve_kv_cache_usage_ratio"] == 0
                assert metrics["agentserve_kv_cache_pages_total"] == handle.engine.pool.num_blocks
                health = await grpc_client.health()
                assert (health.num_running, health.num_waiting, health.kv_pages_used) == (0, 0, 0)
                assert health.kv_pages_total == handle.engine.pool.num_blocks
                assert health.num_sessions == 0
                # A session's pages are counted while it is open and freed (and reported free) on close.
                session = await grpc_client.create_session([{"role": "user", "content": "hello there"}])
                outcome = await session.run_turn(max_tokens=3, temperature=0)
                assert outcome.usage.completion_tokens > 0
                health = await grpc_client.health()
                assert health.num_sessions == 1 and health.kv_pages_used > 0 and health.num_running == 0
                await session.close()
                health = await grpc_client.health()
                assert (health.num_sessions, health.kv_pages_used, health.num_running) == (0, 0, 0)
                metrics = parse_metrics((await http.get("/metrics")).text)
                assert metrics["agentserve_kv_cache_pages_used"] == 0
                assert metrics["agentserve_sessions_resident"] == 0

    asyncio.run(asyncio.wait_for(main(), 240))
