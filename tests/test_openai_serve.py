"""The HTTP app as `agentserve serve` runs it: beside the gRPC service in one process and one event
loop (agentserve/service/serve.py), over one engine and its session store. Sessions opened on the
native side show up in the HTTP app's /metrics; both APIs share the engine (and its prefix cache)."""

from __future__ import annotations

import asyncio

import httpx
import openai

from agentserve.adapters.openai.metrics import parse_metrics
from agentserve.config import EngineConfig
from agentserve.sampling_params import SamplingParams
from agentserve.testing.tiny import tiny_model_cached


def test_http_beside_grpc_with_sessions_in_metrics() -> None:
    from agentserve.service.serve import running_server

    config = EngineConfig.from_kwargs(str(tiny_model_cached("qwen2")), device="cpu", num_blocks=512,
                                      served_model_name="tiny", max_model_len=1024, api_key="k")

    async def main() -> None:
        async with running_server(config, grpc_port=0, http_port=0) as handle:
            url = f"http://127.0.0.1:{handle.http_port}"
            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="k", max_retries=0, timeout=60)
            out = await client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                       max_tokens=4, temperature=0)
            assert out.choices[0].message.content is not None
            async with httpx.AsyncClient(base_url=url, timeout=60) as http:
                m = parse_metrics((await http.get("/metrics")).text)
                assert m["agentserve_sessions_resident"] == 0
                # A session opened and advanced on the native side is counted as resident.
                store = handle.store
                snap = await store.create([{"role": "system", "content": "You are an agent."}])
                async for _ in store.turn(snap.session_id, [{"role": "user", "content": "Go."}],
                                          SamplingParams(max_tokens=3, temperature=0)):
                    pass
                m = parse_metrics((await http.get("/metrics")).text)
                assert m["agentserve_sessions_resident"] == 1
                assert m["agentserve_kv_cache_pages_used"] >= 1  # the session's pages stay resident
                await store.close(snap.session_id)
                m = parse_metrics((await http.get("/metrics")).text)
                assert m["agentserve_sessions_resident"] == 0
                assert m["agentserve_e2e_request_latency_seconds_count"] >= 2  # HTTP and the session turn
                r = await http.post("/v1/chat/completions", json={"model": "tiny", "messages": []})
                assert r.status_code == 401  # the API key guards HTTP as it guards gRPC
            await client.close()

    asyncio.run(main())
