"""Tensor parallelism on the CPU (two ranks over gloo): failures outside a step.

- Rank 0 failing while it builds its runner (a draft model that does not load: the draft lives on
  rank 0 only) fails the engine's start-up with that error, at once, and leaves no worker behind;
  the worker is then waiting in a start-up collective, not for a message.
- A rank killed while the engine is idle (no step has run into it yet) makes every health check
  report the server unhealthy: HTTP /health, AgentService.Health and grpc.health.v1; requests
  then get UNAVAILABLE / 503 (the engine cannot serve any), not an internal error telling them to retry.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any, Optional

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agentserve.adapters.client import AgentClient
from agentserve.config import EngineConfig
from agentserve.llm import LLM
from agentserve.model.arch_config import ModelLoadError
from agentserve.parallel.driver import TensorParallelDriver
from agentserve.service import agent_pb2
from agentserve.service.serve import running_server
from agentserve.testing import tiny_model_cached
from conftest_grpc import run

ENGINE: dict[str, Any] = dict(device="cpu", dtype="float32", num_blocks=64)


def corrupt_draft(tmp_path: Path) -> Path:
    """A one-layer draft directory whose safetensors file is cut short."""
    draft = tmp_path / "draft"
    shutil.copytree(tiny_model_cached("llama", num_layers=1), draft)
    for weights in draft.glob("*.safetensors"):
        weights.write_bytes(weights.read_bytes()[:5000])
    return draft


def test_rank_zero_failing_to_build_its_runner_fails_start_up_at_once(tmp_path: Path) -> None:
    draft = corrupt_draft(tmp_path)
    before = set(multiprocessing.active_children())
    raised: list[Optional[BaseException]] = []

    def start() -> None:
        try:
            LLM(str(tiny_model_cached("llama")), **ENGINE, tensor_parallel_size=2, draft_model=str(draft)).close()
            raised.append(None)
        except BaseException as e:  # noqa: BLE001 - handed to the test's thread
            raised.append(e)

    # A thread, so that a start-up that hangs fails the test instead of stalling the run.
    thread = threading.Thread(target=start, daemon=True)
    started = time.monotonic()
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), "the engine's start-up hung after rank 0 failed to build its runner"
    assert time.monotonic() - started < 30
    assert len(raised) == 1 and isinstance(raised[0], ModelLoadError), raised
    assert "not a valid safetensors file" in str(raised[0])
    assert set(multiprocessing.active_children()) == before


async def health_reports(address: str, http_port: int) -> tuple[int, int, int]:
    """(HTTP /health status code, AgentService.Health status, grpc.health.v1 Check status)."""
    async with httpx.AsyncClient() as http:
        http_status = (await http.get(f"http://127.0.0.1:{http_port}/health")).status_code
    async with AgentClient(address) as client:
        agent_status = (await client.health()).status
    async with grpc.aio.insecure_channel(address) as channel:
        check = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
    return http_status, agent_status, check.status


def test_a_rank_killed_while_idle_makes_every_health_check_unhealthy() -> None:
    config = EngineConfig.from_kwargs(str(tiny_model_cached("qwen2")), **ENGINE, max_model_len=256,
                                      tensor_parallel_size=2)
    serving = (200, agent_pb2.HealthResponse.SERVING, health_pb2.HealthCheckResponse.SERVING)
    unhealthy = (503, agent_pb2.HealthResponse.NOT_SERVING, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def body() -> list[Any]:
        async with running_server(config, grpc_port=0, http_port=0) as handle:
            assert handle.address is not None and handle.http_port is not None
            seen = [await health_reports(handle.address, handle.http_port)]
            driver = handle.engine.runner.parallel
            assert isinstance(driver, TensorParallelDriver)
            worker = driver.processes[0]
            assert worker.pid is not None
            os.kill(worker.pid, signal.SIGKILL)
            worker.join(timeout=10)
            deadline = time.monotonic() + 10.0  # grpc.health.v1 follows the engine within a few seconds
            while True:
                now = await health_reports(handle.address, handle.http_port)
                if now == unhealthy or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
            seen.append(now)
            async with AgentClient(handle.address) as client:
                try:
                    await client.generate_done(prompt_token_ids=[5, 6, 7], max_tokens=2)
                except grpc.aio.AioRpcError as e:
                    seen.append((e.code(), "tensor-parallel rank" in (e.details() or "")))
            async with httpx.AsyncClient() as http:
                r = await http.post(f"http://127.0.0.1:{handle.http_port}/v1/completions",
                                    json={"model": handle.engine.model_name, "prompt": "hi", "max_tokens": 2})
                seen.append((r.status_code, r.json()["error"]["code"]))
            return seen

    assert run(body()) == [serving, unhealthy, (grpc.StatusCode.UNAVAILABLE, True), (503, "engine_unavailable")]
