"""`agentserve serve`: one engine, the gRPC AgentService and (with --http-port) the OpenAI-compatible
HTTP app, in one process and one event loop.

    agentserve serve --model PATH --grpc-port 50051 [--http-port 8000] [--api-key KEY ...] [--api-key-file PATH]

Each API key is a tenant (service/tenants.py); gRPC and HTTP share the tenants and their limits.

SIGINT/SIGTERM shut down gracefully: both servers stop accepting at once (the HTTP listener closes,
new gRPC calls get UNAVAILABLE), in-flight requests and streams of both get the same `grace`
seconds to finish and are then cancelled (a cancelled turn rolls back, a cancelled HTTP stream
aborts its engine requests), sessions are closed, the engine stops.

`running_server(config)` is the same server as an async context manager (tests, demo, benchmarks):
it binds port 0 on 127.0.0.1 unless told otherwise and yields a ServerHandle with the address.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, NoReturn, Optional

import grpc
from grpc_health.v1 import health as grpc_health

from agentserve.chat.render_pool import RenderPool
from agentserve.config import EngineConfig
from agentserve.engine.async_engine import AsyncEngine
from agentserve.http_frontend_config import HttpFrontendConfig
from agentserve.service.grpc_server import AgentServicer, ApiKeyInterceptor, add_to_server
from agentserve.service.tenants import Tenants
from agentserve.service.malformed_requests import MalformedRequestInterceptor
from agentserve.service.standard_services import (add_standard_services, exempt_health_checks, follow_engine,
                                                  mark_draining, mark_serving)
from agentserve.sessions.store import SessionStore
from agentserve.sessions.types import DEFAULT_TTL_SECONDS

logger = logging.getLogger(__name__)

def _grpc_options(config: EngineConfig) -> list[tuple[str, int]]:
    # Receive: the configured request limit (gRPC answers RESOURCE_EXHAUSTED past it, before the
    # message is parsed). Send: large, a session's snapshot with its token ids can be big.
    return [("grpc.max_receive_message_length", config.server.grpc_max_message_bytes),
            ("grpc.max_send_message_length", 256 * 2**20),
            ("grpc.so_reuseport", 0)]


@dataclass
class ServerHandle:
    address: Optional[str]  # "host:port" of the gRPC server (None when it is off)
    grpc_port: Optional[int]
    http_port: Optional[int]
    async_engine: AsyncEngine
    store: SessionStore
    servicer: AgentServicer
    grpc_server: Optional[grpc.aio.Server]
    tenants: Tenants

    @property
    def requires_api_key(self) -> bool:
        return self.tenants.requires_key
    health: Optional[grpc_health.aio.HealthServicer] = None  # grpc.health.v1 (None when gRPC is off)

    @property
    def engine(self) -> Any:
        return self.async_engine.engine


SHUTDOWN_GRACE_S = 5.0


def _uvicorn_server(app: Any, host: str, port: int, grace: float, http: HttpFrontendConfig) -> Any:
    import uvicorn

    class _Server(uvicorn.Server):
        # The process's signal handlers are ours: uvicorn must not replace them or re-raise signals.
        @contextlib.contextmanager
        def capture_signals(self):  # type: ignore[no-untyped-def]
            yield

        def install_signal_handlers(self) -> None:  # uvicorn < 0.29
            pass

    # timeout_graceful_shutdown: without it uvicorn waits for every open stream to end on its own.
    # uvicorn annotates it int, but only hands it to asyncio.timeout, which takes any float (tests use 0.2 s).
    config = uvicorn.Config(app, host=host, port=port, log_level=http.uvicorn_log_level, lifespan="on",
                            timeout_graceful_shutdown=grace,  # type: ignore[arg-type]
                            access_log=not http.disable_uvicorn_access_log, root_path=http.root_path or "",
                            ssl_keyfile=http.ssl_keyfile, ssl_certfile=http.ssl_certfile,
                            ssl_ca_certs=http.ssl_ca_certs, ssl_cert_reqs=http.ssl_cert_reqs,
                            h11_max_incomplete_event_size=http.h11_max_incomplete_event_size)
    if http.ssl_ciphers is not None:  # else uvicorn's own default, which differs between its versions
        config.ssl_ciphers = http.ssl_ciphers  # read when the server loads its config (the TLS context)
    return _Server(config)


def _bind_grpc(server: grpc.aio.Server, address: str, tls: HttpFrontendConfig) -> int:
    """Binds the gRPC port, over TLS with the HTTP server's certificate when one is set (a bearer key must not
    cross the network in clear text on one port and encrypted on the other); client certificates are checked
    against ssl_ca_certs when ssl_cert_reqs asks for them (2: required)."""
    if tls.ssl_keyfile is None or tls.ssl_certfile is None:
        return server.add_insecure_port(address)
    pair = (Path(tls.ssl_keyfile).expanduser().read_bytes(), Path(tls.ssl_certfile).expanduser().read_bytes())
    roots = Path(tls.ssl_ca_certs).expanduser().read_bytes() if tls.ssl_ca_certs is not None else None
    credentials = grpc.ssl_server_credentials([pair], root_certificates=roots,
                                              require_client_auth=tls.ssl_cert_reqs == ssl.CERT_REQUIRED)
    return server.add_secure_port(address, credentials)


@contextlib.asynccontextmanager
async def running_server(config: EngineConfig, *, async_engine: Optional[AsyncEngine] = None,
                         host: Optional[str] = None, grpc_port: Optional[int] = 0, http_port: Optional[int] = None,
                         grace: float = SHUTDOWN_GRACE_S, default_ttl: float = DEFAULT_TTL_SECONDS,
                         expiry_interval: float = 1.0) -> AsyncIterator[ServerHandle]:
    """Starts the servers on an engine (a new one from config, or `async_engine`, which then stays up
    afterwards). grpc_port=0 binds a free port; None leaves gRPC off; likewise http_port."""
    host = host or config.server.host or "127.0.0.1"
    tenants = Tenants.from_config(config.server)  # a bad key file fails before the model loads
    own_engine = async_engine is None
    if async_engine is None:
        from agentserve.engine.engine import Engine

        engine = await asyncio.get_running_loop().run_in_executor(None, Engine, config)
        async_engine = AsyncEngine(engine)
    engine_ = async_engine.engine
    # One render/tokenize pool for gRPC and HTTP; the limits are the served config's.
    render_pool = RenderPool(engine_.tokenizer, engine_.max_model_len, config.server)
    store = SessionStore(async_engine, default_ttl=default_ttl, expiry_interval=expiry_interval,
                         render_pool=render_pool, max_sessions=config.server.max_sessions,
                         max_sessions_per_tenant=config.server.max_sessions_per_tenant)
    store.start()
    servicer = AgentServicer(async_engine, store, tenants)
    server: Optional[grpc.aio.Server] = None
    uv: Any = None
    uv_task: Optional[asyncio.Task[None]] = None
    bound: Optional[int] = None
    health: Optional[grpc_health.aio.HealthServicer] = None
    following: Optional[asyncio.Task[None]] = None
    try:
        if grpc_port is not None:
            interceptors: list[grpc.aio.ServerInterceptor] = (
                [exempt_health_checks(ApiKeyInterceptor(tenants))] if tenants.requires_key else [])
            interceptors.append(MalformedRequestInterceptor())  # innermost: the key check still comes first
            server = grpc.aio.server(interceptors=interceptors, options=_grpc_options(config))
            add_to_server(server, servicer)
            health = await add_standard_services(server)
            bound = _bind_grpc(server, f"{host}:{grpc_port}", config.server)
            if not bound:
                raise RuntimeError(f"cannot bind the gRPC server to {host}:{grpc_port}")
            await server.start()
        http_bound = None
        if http_port is not None:
            from agentserve.adapters.openai.app import create_app

            app = create_app(async_engine, config, store, render_pool=render_pool, tenants=tenants)
            uv = _uvicorn_server(app, host, http_port, grace, config.server)
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
            following = asyncio.get_running_loop().create_task(follow_engine(health, async_engine.is_running))
        yield ServerHandle(address=f"{host}:{bound}" if bound else None, grpc_port=bound, http_port=http_bound,
                           async_engine=async_engine, store=store, servicer=servicer, grpc_server=server,
                           tenants=tenants, health=health)
    finally:
        if following is not None:
            following.cancel()
        if health is not None:
            await mark_draining(health)  # probes and Watch streams see NOT_SERVING before the servers stop
        await _stop_servers(servicer, server, uv, uv_task, grace)
        await store.stop()
        await store.close_all()
        store.detach()
        render_pool.close()
        if own_engine:
            await asyncio.get_running_loop().run_in_executor(None, async_engine.shutdown)


async def _stop_servers(servicer: AgentServicer, server: Optional[grpc.aio.Server], uv: Any,
                        uv_task: Optional[asyncio.Task[None]], grace: float) -> None:
    """Both servers stop accepting now and drain together, each bounded by `grace` (one after the
    other, HTTP would keep accepting while gRPC drained, and its streams would get no bound)."""
    servicer.serving = False
    draining: list[Any] = []
    if uv is not None and uv_task is not None:
        uv.should_exit = True  # the server's loop sees it within 0.1 s and closes its listener
        draining.append(uv_task)
    if server is not None:
        draining.append(server.stop(grace))  # refuses new calls; cancels the rest after `grace`
    for result in await asyncio.gather(*draining, return_exceptions=True):
        if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
            logger.error("stopping a server failed: %r", result)


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
              + (f" — API key required ({len(handle.tenants.names)} tenants)" if handle.requires_api_key else ""),
              flush=True)
        await stop.wait()
        print(f"agentserve: shutting down (in-flight requests get {SHUTDOWN_GRACE_S:g} s)", flush=True)
    return 0


def serve(config: EngineConfig) -> NoReturn:
    """The CLI's `agentserve serve`: runs until SIGINT/SIGTERM, then exits the process."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    rc = asyncio.run(_serve(config))
    # Everything is closed by now. Interpreter finalization after torch and Triton have loaded takes
    # seconds (native teardown, no Python frame), which would push the exit of a SIGTERMed server
    # past its grace period: flush and leave.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
