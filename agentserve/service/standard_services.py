"""The standard gRPC services served beside AgentService, so generic tools work unchanged:

- server reflection (`grpc.reflection.v1alpha.ServerReflection`): grpcurl, grpcui and Postman list
  and call AgentService without the .proto;
- health checking (`grpc.health.v1.Health`): Kubernetes gRPC probes, load balancers. The overall
  status ("") and "agentserve.v1.AgentService" are NOT_SERVING until `mark_serving` (called once the
  engine is loaded and the server listens) and NOT_SERVING again from `mark_draining` (shutdown)
  on, or once the engine stops running (`follow_engine`), which also reaches open Watch streams.

API keys: a Kubernetes gRPC probe cannot send metadata (its spec has only a port and a service
name), so `exempt_health_checks` lets grpc.health.v1 calls past the API-key interceptor, like the
unauthenticated HTTP `/health` of vLLM. Everything else, reflection included, needs the key
(grpcurl sends it with `-H 'authorization: Bearer KEY'`).
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from agentserve.service import agent_pb2

AGENT_SERVICE = agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
# The overall server status is the empty service name (the health protocol's convention).
_HEALTH_STATUS_KEYS = (health.OVERALL_HEALTH, AGENT_SERVICE)


# The servicer is grpc_health's asyncio one, health.aio.HealthServicer (health.HealthServicer is the
# sync one): its set() and enter_graceful_shutdown() are awaited.
async def add_standard_services(server: grpc.aio.Server) -> health.aio.HealthServicer:
    """Adds reflection and grpc.health.v1 to `server` (before it starts); returns the health
    servicer, NOT_SERVING until `mark_serving`."""
    health_servicer = health.aio.HealthServicer()
    for key in _HEALTH_STATUS_KEYS:  # the servicer starts with "" SERVING: nothing is ready before we say so
        await health_servicer.set(key, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((AGENT_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME), server)
    return health_servicer


async def mark_serving(health_servicer: health.aio.HealthServicer) -> None:
    for key in _HEALTH_STATUS_KEYS:
        await health_servicer.set(key, health_pb2.HealthCheckResponse.SERVING)


async def follow_engine(health_servicer: health.aio.HealthServicer, is_running: Callable[[], bool],
                        interval_s: float = 1.0) -> None:
    """NOT_SERVING once the engine stops running (a tensor-parallel rank lost, the step thread gone):
    the health servicer only knows what it is told, and probes must see what /health sees. An
    engine that stopped does not come back, so this ends there."""
    while is_running():
        await asyncio.sleep(interval_s)
    for key in _HEALTH_STATUS_KEYS:
        await health_servicer.set(key, health_pb2.HealthCheckResponse.NOT_SERVING)


async def mark_draining(health_servicer: health.aio.HealthServicer) -> None:
    """NOT_SERVING for good (later `mark_serving` calls are ignored)."""
    await health_servicer.enter_graceful_shutdown()


class _HealthChecksExempt(grpc.aio.ServerInterceptor):
    def __init__(self, guard: grpc.aio.ServerInterceptor) -> None:
        self._guard = guard

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
            handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        if handler_call_details.method.startswith(f"/{HEALTH_SERVICE}/"):
            return await continuation(handler_call_details)
        return await self._guard.intercept_service(continuation, handler_call_details)


def exempt_health_checks(guard: grpc.aio.ServerInterceptor) -> grpc.aio.ServerInterceptor:
    """`guard` (the API-key interceptor) for every call except grpc.health.v1's Check and Watch."""
    return _HealthChecksExempt(guard)
