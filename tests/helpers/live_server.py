"""An OpenAI-compatible server on loopback over a tiny model, for tests that talk to it with the official
client: `with live_openai("qwen2", max_model_len=512) as client: ...`."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import openai

from agentserve.adapters.openai.app import create_app
from agentserve.adapters.openai.server import ServerThread
from agentserve.config import EngineConfig
from agentserve.engine.async_engine import AsyncEngine
from agentserve.engine.engine import Engine
from agentserve.service.tenants import Tenants
from agentserve.testing import tiny_model_cached


@contextlib.contextmanager
def live_openai(arch_or_path: str, served_model_name: str = "m", tenants: Optional[Tenants] = None,
                **engine: Any) -> Iterator[openai.OpenAI]:
    """`arch_or_path`: a tiny architecture's name, or a model directory; `tenants`: API keys to require."""
    model = arch_or_path if "/" in arch_or_path else str(tiny_model_cached(arch_or_path))
    config = EngineConfig.from_kwargs(model, device="cpu", served_model_name=served_model_name,
                                      **{"num_blocks": 256, **engine})
    aeng = AsyncEngine(Engine(config))
    server = ServerThread(create_app(aeng, config, tenants=tenants)).start()
    try:
        yield openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    finally:
        server.stop()
        aeng.shutdown()


def server_root(client: openai.OpenAI) -> str:
    """The server's own URL (its /tokenize, /metrics, /invocations, ...) from a client of its /v1 routes."""
    return str(client.base_url).rstrip("/").removesuffix("/v1")
