"""SIGTERM on a real `agentserve serve` process (tiny model, CPU, gRPC and HTTP): both servers stop
accepting at once, in-flight streams of both are cut at the grace period, the process exits within
grace + a small slack."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Optional

import grpc
import httpx
import pytest

from agentserve.service import agent_pb2 as pb
from agentserve.service import agent_pb2_grpc as pb_grpc
from agentserve.service.serve import SHUTDOWN_GRACE_S
from agentserve.testing.tiny import tiny_model_cached

# Engine shutdown, session close and interpreter exit after the grace period.
EXIT_SLACK_S = 3.0
# Long enough that no stream can end on its own within the test (tokens are ~10-100/s on CPU).
STREAM_TOKENS = 3500


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Stream(threading.Thread):
    """Runs one long stream in the background; records when the first token came and when it ended."""

    def __init__(self, kind: str, http_port: int, grpc_port: int) -> None:
        super().__init__(daemon=True)
        self.kind, self.http_port, self.grpc_port = kind, http_port, grpc_port
        self.first_token = threading.Event()
        self.ended_at: Optional[float] = None
        self.chunks = 0

    def run(self) -> None:
        try:
            if self.kind == "http":
                body = {"model": "tiny", "prompt": "count:", "max_tokens": STREAM_TOKENS, "ignore_eos": True,
                        "stream": True, "temperature": 0}
                with httpx.stream("POST", f"http://127.0.0.1:{self.http_port}/v1/completions", json=body,
                                  timeout=120) as r:
                    for _ in r.iter_lines():
                        self.chunks += 1
                        self.first_token.set()
            else:
                with grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}") as channel:
                    stub = pb_grpc.AgentServiceStub(channel)
                    for _ in stub.Generate(pb.GenerateRequest(prompt="count:", sampling=pb.SamplingParams(
                            max_tokens=STREAM_TOKENS, ignore_eos=True, temperature=0)), timeout=120):
                        self.chunks += 1
                        self.first_token.set()
        except Exception:  # noqa: BLE001 - the server cutting the stream is what the test wants
            pass
        finally:
            self.ended_at = time.monotonic()


def _wait_ready(proc: subprocess.Popen, deadline_s: float) -> None:
    assert proc.stdout is not None
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        line = proc.stdout.readline()
        if not line:
            break
        if "agentserve: serving" in line:
            return
    proc.kill()
    pytest.fail(f"the server did not start: {proc.stdout.read()}")


def test_sigterm_refuses_new_requests_and_bounds_streams_by_grace() -> None:
    http_port, grpc_port = _free_port(), _free_port()
    env = {**os.environ, "TRITON_INTERPRET": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "agentserve.cli", "serve", "--model", str(tiny_model_cached("qwen2")),
         "--served-model-name", "tiny", "--device", "cpu", "--dtype", "float32", "--num-blocks", "512",
         "--max-model-len", "4096", "--host", "127.0.0.1", "--grpc-port", str(grpc_port),
         "--http-port", str(http_port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        _wait_ready(proc, 120)
        streams = [_Stream(kind, http_port, grpc_port) for kind in ("http", "http", "grpc", "grpc")]
        for s in streams:
            s.start()
        for s in streams:
            assert s.first_token.wait(60), f"{s.kind} stream got no token"
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)  # the server's loop notices the signal (uvicorn checks every 0.1 s)
        # New requests are refused at once, on both protocols, while the old streams still run.
        with pytest.raises(httpx.TransportError):
            httpx.post(f"http://127.0.0.1:{http_port}/v1/completions",
                       json={"model": "tiny", "prompt": "hi", "max_tokens": 2}, timeout=5)
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            with pytest.raises(grpc.RpcError) as err:
                pb_grpc.AgentServiceStub(channel).Health(pb.HealthRequest(), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert all(s.ended_at is None for s in streams), "a stream ended before the grace period"
        proc.wait(timeout=SHUTDOWN_GRACE_S + EXIT_SLACK_S + 30)  # generous: measured below
        exited = time.monotonic() - sent
        for s in streams:
            s.join(10)
        ended = [s.ended_at - sent for s in streams if s.ended_at is not None]
        print(f"\nSIGTERM: process exited after {exited:.2f} s; streams ended after "
              f"{', '.join(f'{t:.2f}' for t in ended)} s (grace {SHUTDOWN_GRACE_S:g} s)")
        assert len(ended) == len(streams)
        assert all(t <= SHUTDOWN_GRACE_S + 2.0 for t in ended), ended
        assert exited <= SHUTDOWN_GRACE_S + EXIT_SLACK_S, exited
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
