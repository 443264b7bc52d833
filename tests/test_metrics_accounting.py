"""What /metrics counts, by vLLM's rules: a request refused with a 400 is no served request; TTFT and e2e run from
the frontend's arrival (the wait for the step thread included); prompt tokens are counted when a sequence's prefill
completes, once per sequence of n, never for a request that never ran; n's unforked siblings wait; the throughput
gauge falls to 0 when idle; and the per-request series vLLM's dashboards read besides latency are there."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import httpx
import openai
import pytest

from agentserve import SamplingParams
from agentserve.adapters.openai.metrics import parse_metrics
from agentserve.config import EngineConfig
from agentserve.engine import metrics as metrics_module
from agentserve.engine.async_engine import AsyncEngine
from agentserve.engine.engine import Engine
from agentserve.engine.metrics import EngineMetrics, live_engine_gauges
from agentserve.testing import tiny_model_cached
from helpers.live_server import live_openai, server_root

LABEL = '{model_name="m"}'


def _scrape(client: openai.OpenAI) -> dict[str, float]:
    return parse_metrics(httpx.get(server_root(client) + "/metrics", timeout=30).text)


def test_a_constraint_refused_with_400_counts_as_no_request() -> None:
    with live_openai("qwen2", max_model_len=256) as client:
        client.completions.create(model="m", prompt="warm up", max_tokens=2, extra_body={"ignore_eos": True})
        before = _scrape(client)
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="m", prompt="one two three", max_tokens=4,
                                      extra_body={"structured_outputs": {"regex": "(unclosed"}})
        after = _scrape(client)
    for name in ("vllm:prompt_tokens_total" + LABEL, "vllm:e2e_request_latency_seconds_count" + LABEL,
                 "vllm:request_prompt_tokens_count" + LABEL, "agentserve_requests_finished_total"):
        assert after[name] == before[name], name
    assert not any(k.startswith("vllm:request_success_total{") and 'finished_reason="error"' in k for k in after)


def test_prompt_tokens_count_each_sequence_once_its_prefill_is_in() -> None:
    engine = Engine(EngineConfig.from_kwargs(str(tiny_model_cached("qwen2")), device="cpu", num_blocks=128,
                                             max_model_len=256, max_num_seqs=8))
    prompt = [5, 6, 7, 8, 9]
    engine.add_request("n3", prompt, SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=3, ignore_eos=True))
    engine.add_request("dropped", [11, 12, 13], SamplingParams(max_tokens=3))
    assert live_engine_gauges(engine).num_waiting == 4  # the two unforked siblings wait too (vLLM: n requests)
    engine.abort("dropped")  # left before it ran: its prompt was never processed
    assert engine.metrics.prompt_tokens_total == 0
    while engine.has_unfinished():
        engine.step()
    assert engine.metrics.prompt_tokens_total == 3 * len(prompt)
    engine.close()


def test_arrival_is_stamped_before_the_wait_for_the_step_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """A request that comes in during a long step waits for it; vLLM's TTFT and e2e count that wait."""
    aeng = AsyncEngine(Engine(EngineConfig.from_kwargs(str(tiny_model_cached("qwen2")), device="cpu", num_blocks=64,
                                                       max_model_len=128)))
    seen: list[Any] = []
    add_request = aeng.engine.add_request

    def recording(*args: Any, **kwargs: Any) -> None:
        seen.append((kwargs.get("arrival_time"), time.monotonic()))
        add_request(*args, **kwargs)

    monkeypatch.setattr(aeng.engine, "add_request", recording)
    started = threading.Event()

    def long_step() -> None:
        started.set()
        time.sleep(0.6)

    async def main() -> Any:
        busy = asyncio.ensure_future(aeng.run(long_step))
        await asyncio.get_running_loop().run_in_executor(None, started.wait)
        outs = [o async for o in aeng.generate("r", [5, 6, 7], SamplingParams(max_tokens=2, ignore_eos=True))]
        await busy
        return outs[-1]

    try:
        out = asyncio.run(main())
    finally:
        aeng.shutdown()
    arrival, added = seen[0]
    assert added - arrival >= 0.4
    assert out.metrics.arrival_time == arrival and out.metrics.first_token_time - arrival >= 0.4


def test_the_throughput_gauge_falls_to_zero_when_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(metrics_module.time, "monotonic", lambda: clock[0])
    m = EngineMetrics()
    for _ in range(10):
        m.record_step(50)
        clock[0] += 0.5
    assert m.generation_tokens_per_s == pytest.approx(500 / 5.0)
    clock[0] += metrics_module.RATE_WINDOW_S
    assert m.generation_tokens_per_s == 0.0


def test_vllm_dashboard_series_per_request_and_per_step() -> None:
    with live_openai("qwen2", max_model_len=256) as client:
        before = _scrape(client)
        client.completions.create(model="m", prompt="one two three", max_tokens=5, n=2, temperature=1.0, seed=3,
                                  extra_body={"ignore_eos": True})
        after = _scrape(client)

    def moved(name: str) -> float:
        return after["vllm:" + name + LABEL] - before.get("vllm:" + name + LABEL, 0.0)

    for phase in ("request_prefill_time_seconds", "request_decode_time_seconds", "request_inference_time_seconds"):
        assert moved(phase + "_count") == 2, phase  # one per sequence
    assert moved("request_decode_time_seconds_sum") > 0
    assert moved("request_params_max_tokens_count") == 2 and moved("request_params_max_tokens_sum") == 10
    assert moved("request_params_n_count") == 1 and moved("request_params_n_sum") == 2  # one per request
    assert moved("request_max_num_generation_tokens_count") == 1
    assert moved("request_max_num_generation_tokens_sum") == 5
    assert moved("iteration_tokens_total_count") >= 5  # a prefill step and the decode steps
    assert moved("iteration_tokens_total_sum") >= 3 + 2 * 4
    info = [k for k in after if k.startswith("vllm:cache_config_info{")]
    assert len(info) == 1 and 'block_size="16"' in info[0] and 'num_gpu_blocks="256"' in info[0]
    assert after[info[0]] == 1
