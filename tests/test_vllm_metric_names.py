"""/metrics also carries vLLM's metric names (`vllm:...{model_name=...}`), so that the dashboards and
alerts of a vLLM deployment keep working on agentserve, with the values of agentserve's own series."""

from __future__ import annotations

import httpx

from agentserve.adapters.openai.metrics import parse_metrics
from helpers.live_server import live_openai, server_root


def test_vllm_metric_names_mirror_agentserve_series() -> None:
    with live_openai("qwen2", max_model_len=256) as client:
        out = client.completions.create(model="m", prompt="one two three", max_tokens=4, temperature=0,
                                        extra_body={"ignore_eos": True})
        base = server_root(client)
        m = parse_metrics(httpx.get(base + "/metrics", timeout=30).text)
    label = '{model_name="m"}'
    assert m["vllm:num_requests_running" + label] == 0 and m["vllm:num_requests_waiting" + label] == 0
    assert m["vllm:kv_cache_usage_perc" + label] == m["vllm:gpu_cache_usage_perc" + label] == \
        m["agentserve_kv_cache_usage_ratio"]
    assert m["vllm:prompt_tokens_total" + label] == m["agentserve_prompt_tokens_total"] == out.usage.prompt_tokens
    assert m["vllm:generation_tokens_total" + label] == m["agentserve_generation_tokens_total"] == 4
    for histogram in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
                      "inter_token_latency_seconds", "time_per_output_token_seconds", "request_prompt_tokens",
                      "request_generation_tokens"):
        assert m[f"vllm:{histogram}_count" + label] >= 1, histogram
    assert m['vllm:e2e_request_latency_seconds_sum' + label] == m["agentserve_e2e_request_latency_seconds_sum"]
    assert m['vllm:request_success_total{finished_reason="length",model_name="m"}'] == 1


def test_request_success_counts_every_api() -> None:
    """vLLM counts request_success_total{finished_reason} for every finished engine request, with the
    engine's reasons; it was bumped by chat and completions only (a Responses request went uncounted)."""
    with live_openai("qwen2", max_model_len=256) as client:
        client.completions.create(model="m", prompt="one two", max_tokens=3, extra_body={"ignore_eos": True})
        client.responses.create(model="m", input="one two", max_output_tokens=3, store=False)
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=30,
                                       stop=[" "], extra_body={"min_tokens": 0})
        m = parse_metrics(httpx.get(server_root(client) + "/metrics", timeout=30).text)
    finished = {k: v for k, v in m.items() if k.startswith("vllm:request_success_total{")}
    assert m['vllm:request_success_total{finished_reason="length",model_name="m"}'] >= 1
    assert sum(finished.values()) == 3 == m['vllm:e2e_request_latency_seconds_count{model_name="m"}']
