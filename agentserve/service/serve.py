"""`agentserve serve`: one engine, the gRPC AgentService and (with --http-port) the OpenAI-compatible
HTTP app, in one process and one event loop.

    agentserve serve --model PATH --grpc-port 50051 [--http-port 8000] [--api-key KEY]

SIGINT/SIGTERM shut down gracefully: new RPCs are refused, in-flight ones get `grace` seconds to
finish and are then cancelled (a cancelled turn rolls back), sessions are closed, the engine stops.

`running_server(config)` is the same server as an async context manager (tests, demo, benchmarks):
it binds port 0 on 127.0.0.1 unless told otherwise and yields a ServerHandle with the address.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional

import grpc

from agentserve.config import EngineConfig
from agentserve.engine.async_engine import AsyncEngine
from agentserve.service.grpc_server import AgentServicer, ApiKeyInterceptor, add_to_server
from agentserve.service.standard_services import (HealthServicer, add_standard_services, exempt_health_checks,
                                                  mark_draining, mark_serving)
from agentserve.sessions.store import DEFAULT_TTL_SECONDS, SessionStore

logger = logging.getLogger(__name__)

_GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", 256 * 2**20),
    ("grpc.max_send_message_length", 256 * 2**20),
    ("grpc.so_reuseport", 0),
]


@dataclass
class ServerHandle:
    address: Optional[str]  # "host:port" of the gRPC server (None when it is off)
    grpc_port: Optional[int]
    http_port: Optional[int]
    async_engine: AsyncEngine
    store: SessionStore
    servicer: AgentServicer
    grpc_server: Optional[grpc.aio.Server]
    api_key: Optional[str]
    health: Optional[HealthServicer] = None  # grpc.health.v1 (None when gRPC is off)

    @property
    def engine(self) -> Any:
        return self.async_engine.engine


def _uvicorn_server(app: Any, host: str, port: int) -> Any:
    import uvicorn

    class _Server(uvicorn.Server):
        # The process's signal handlers are ours: uvicorn must not replace them or re-raise signals.
        @contextlib.contextmanager
        def capture_signals(self):  # type: ignore[no-untyped-def]
            yield

        def install_signal_handlers(self) -> None:  # uvicorn < 0.29
            pass

    return _Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))


@contextlib.asynccontextmanager
async def running_server(config: EngineConfig, *, async_engine: Optional[AsyncEngine] = None,
                         host: Optional[str] = None, grpc_port: Optional[int] = 0, http_port: Optional[int] = None,
                         grace: float = 5.0, default_ttl: float = DEFAULT_TTL_SECONDS,
                         expiry_interval: float = 1.0) -> AsyncIterator[ServerHandle]:
    """Starts the servers on an engine (a new one from config, or `async_engine`, which then stays up
    afterwards). grpc_port=0 binds a free port; None leaves gRPC off; likewise http_port."""
    host = host or config.server.host or "127.0.0.1"
    own_engine = async_engine is None
    if async_engine is None:
        from agentserve.engine.engine import Engine

        engine = await asyncio.get_running_loop().run_in_executor(None, Engine, config)
        async_engine = AsyncEngine(engine)
    store = SessionStore(async_engine, default_ttl=default_ttl, expiry_interval=expiry_interval)
    store.start()
    servicer = AgentServicer(async_engine, store)
    api_key = config.server.api_key
    server: Optional[grpc.aio.Server] = None
    uv: Any = None
    uv_task: Optional[asyncio.Task[None]] = None
    bound: Optional[int] = None
    health: Optional[HealthServicer] = None
    try:
        if grpc_port is not None:
            server = grpc.aio.server(interceptors=[exempt_health_checks(ApiKeyInterceptor(api_key))] if api_key
                                     else None, options=_GRPC_OPTIONS)
            add_to_server(server, servicer)
            health = await add_standard_services(server)
            bound = server.add_insecure_port(f"{host}:{grpc_port}")
            if not bound:
                raise RuntimeError(f"cannot bind the gRPC server to {host}:{grpc_port}")
            await server.start()
        http_bound = None
        if http_port is not None:
            from agentserve.adapters.openai.app import create_app

            app = create_app(async_engine, config, store)
            uv = _uvicorn_server(app, host, http_port)
            uv_task = asyncio.get_running_loop().create_task(uv.serve())
            while not uv.started:
                if uv_task.done():
                    uv_task.result()
                    raise RuntimeError(f"the HTTP server did not start on {host}:{http_port}")
                await asyncio.sleep(0.02)
            http_bound = http_port
            if http_port == 0 and uv.servers:
                http_bound = uv.servers[0].sockets[0].getsockname()[1]
        if health is not None:
            await mark_serving(health)  # the engine is loaded and both servers listen
        yield ServerHandle(address=f"{host}:{bound}" if bound else None, grpc_port=bound, http_port=http_bound,
                           async_engine=async_engine, store=store, servicer=servicer, grpc_server=server,
                           api_key=api_key, health=health)
    finally:
        if health is not None:
            await mark_draining(health)  # probes and Watch streams see NOT_SERVING before the servers stop
        servicer.serving = False
        if server is not None:
            await server.stop(grace)  # in-flight RPCs get `grace` seconds, then are cancelled
        if uv is not None and uv_task is not None:
            uv.should_exit = True
            with contextlib.suppress(Exception):
                await uv_task
        await store.stop()
        await store.close_all()
        store.detach()
        if own_engine:
            await asyncio.get_running_loop().run_in_executor(None, async_engine.shutdown)


async def _serve(config: EngineConfig) -> int:
    if config.server.grpc_port is None and config.server.http_port is None:
        print("agentserve serve: give --grpc-port and/or --http-port")
        return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    async with running_server(config, grpc_port=config.server.grpc_port, http_port=config.server.http_port,
                              host=config.server.host) as handle:
        e = handle.engine
        parts = []
        if handle.address:
            parts.append(f"gRPC on {handle.address}")
        if handle.http_port is not None:
            parts.append(f"HTTP on http://{config.server.host}:{handle.http_port}")
        print(f"agentserve: serving {e.model_name} ({e.pool.num_blocks} KV pages of {e.pool.block_size} tokens, "
              f"{handle.store.num_swap_slots} swap slots) — {', '.join(parts)}"
              + (" — API key required" if handle.api_key else ""), flush=True)
        await stop.wait()
        print("agentserve: shutting down (in-flight requests get 5 s)", flush=True)
    return 0


def serve(config: EngineConfig) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(_serve(config))
