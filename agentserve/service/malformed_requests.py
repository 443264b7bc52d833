"""Malformed request bytes are the client's error: INVALID_ARGUMENT, not UNKNOWN.

grpc turns an exception raised by a request deserializer into UNKNOWN ("Exception deserializing
request!"), which tells the client nothing and reads as a server fault. This interceptor wraps every
method's deserializer so that a message that does not parse (truncated, wrong wire type, invalid
UTF-8 in a string field) becomes a marker object instead, and the method's behaviour, seeing the
marker, aborts with INVALID_ARGUMENT naming the message type before any servicer code runs.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Union

import grpc
from google.protobuf.message import DecodeError


@dataclass(frozen=True)
class MalformedRequest:
    """What the wrapped deserializer returns for bytes that are not a valid message."""
    method: str
    reason: str

    @property
    def text(self) -> str:
        return (f"the {self.method} request is not a valid protobuf message ({self.reason}); send the "
                "request message of the AgentService .proto, serialized")


def _tolerant(deserializer: Callable[[bytes], Any], method: str) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except (DecodeError, UnicodeDecodeError) as e:
            # Only the exception's type goes into the reply: its text may quote the bytes.
            return MalformedRequest(method, type(e).__name__)

    return deserialize


def _guard_unary(behavior: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]
                 ) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, MalformedRequest):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.text)
        return await behavior(request, context)

    return guarded


def _guard_stream(behavior: Callable[[Any, grpc.aio.ServicerContext], Union[AsyncIterator[Any], Awaitable[None]]]
                  ) -> Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]:
    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        if isinstance(request, MalformedRequest):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.text)
        result = behavior(request, context)
        if inspect.isawaitable(result):
            # grpc.aio also takes streaming handlers that write with context.write() and return None
            # (grpc.health.v1's Watch does): there is nothing to iterate.
            await result
            return
        async for item in result:
            yield item

    return guarded


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    """Put it last (innermost) so that API-key checks still come first."""

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
                                handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None or handler.request_streaming:
            return handler  # AgentService has no client-streaming methods
        kw = dict(request_deserializer=_tolerant(handler.request_deserializer, handler_call_details.method),
                  response_serializer=handler.response_serializer)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(_guard_stream(handler.unary_stream), **kw)
        return grpc.unary_unary_rpc_method_handler(_guard_unary(handler.unary_unary), **kw)
