"""Speculation's counters over the servers: /metrics has vLLM's spec_decode names (drafts, draft tokens,
accepted tokens in all and per position, acceptance rate, mean accepted length, proposals continued on
the device), consistent with the
engine's own counts, with the target as its own draft (everything accepted)."""

from __future__ import annotations

import asyncio

import httpx

from agentserve.adapters.openai.metrics import parse_metrics
from agentserve.config import EngineConfig
from agentserve.service.serve import running_server
from agentserve.testing.tiny import tiny_model_cached


def test_spec_decode_metrics_are_exported() -> None:
    path = str(tiny_model_cached("qwen2"))
    config = EngineConfig.from_kwargs(path, device="cpu", num_blocks=256, served_model_name="tiny", max_model_len=512,
                                      draft_model=path, num_speculative_tokens=3, spec_dynamic=False)

    async def main() -> None:
        async with running_server(config, http_port=0) as handle:
            url = f"http://127.0.0.1:{handle.http_port}"
            async with httpx.AsyncClient(base_url=url, timeout=60) as http:
                body = {"model": "tiny", "prompt": "one two three four", "max_tokens": 24, "temperature": 0,
                        "ignore_eos": True}
                r = await http.post("/v1/completions", json=body)
                assert r.status_code == 200, r.text
                assert r.json()["usage"]["completion_tokens"] == 24
                text = (await http.get("/metrics")).text
        metrics = parse_metrics(text)
        m = handle.engine.metrics
        assert metrics["agentserve_spec_decode_num_drafts_total"] == m.spec_num_drafts > 0
        assert metrics["agentserve_spec_decode_num_draft_tokens_total"] == m.spec_num_draft_tokens
        assert metrics["agentserve_spec_decode_num_accepted_tokens_total"] == m.spec_num_accepted_tokens
        assert metrics["agentserve_spec_decode_acceptance_rate"] == 1.0
        # Proposals after the first came from the device, behind their verification (spec/continuation.py).
        continued = metrics["agentserve_spec_decode_num_continued_proposals_total"]
        assert continued == m.spec_num_continued_proposals and 0 < continued < m.spec_num_drafts
        # 3 drafts + the bonus token per verification row, fewer in the last rows (max_tokens caps the drafts).
        mean = metrics["agentserve_spec_decode_mean_accepted_length"]
        assert mean == 1 + m.spec_num_accepted_tokens / m.spec_num_drafts and 3.0 < mean <= 4.0
        assert 'agentserve_spec_decode_num_accepted_tokens_per_pos_total{position="0"}' in text
        assert 'agentserve_spec_decode_num_accepted_tokens_per_pos_total{position="2"}' in text

    asyncio.run(main())
