"""AgentService over grpc.aio: sessions (sessions/store.py), stateless generation, models, health.

Every RPC maps errors to status codes with a readable message: NOT_FOUND (session, model, adapter),
INVALID_ARGUMENT (bad messages, roles, sampling, schema, over-long input, a per-request limit,
text that is not valid UTF-8), FAILED_PRECONDITION (a turn already running on the session),
RESOURCE_EXHAUSTED (queue full; a message over --grpc-max-message-bytes), UNAUTHENTICATED (API key),
CANCELLED (the turn's session was closed), UNAVAILABLE (shutting down).

Tenants (service/tenants.py): the API key an RPC carries names its tenant. Sessions are the creating
tenant's: another tenant's session is NOT_FOUND on every call, and ListSessions lists only one's own.
A tenant's requests and sessions hash their KV pages under its own cache salt. Past a tenant's limit
of requests in flight, or the session limits, calls get RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import time
from typing import Any, AsyncIterator, Awaitable, Callable, Optional, Sequence

import grpc

from agentserve.chat import limits as L
from agentserve.chat import render as R
from agentserve.chat.messages import SESSION_RULES, normalize_messages, parse_json_object
from agentserve.chat.reply import ReplyStream
from agentserve.chat.tools import normalize_tools
from agentserve.engine.async_engine import AsyncEngine
from agentserve.engine.metrics import live_engine_gauges
from agentserve.errors import EngineDeadError, InvalidRequestError, QueueFullError, SessionError
from agentserve.lora.interface import adapter_names
from agentserve.sampling_params import SamplingParams
from agentserve.service import agent_pb2 as pb
from agentserve.service import agent_pb2_grpc as pb_grpc
from agentserve.service.tenants import Tenant, TenantLimitError, Tenants
from agentserve.sessions.store import (SessionSnapshot, SessionState, SessionStore, TextEvent,
                                       Timing, ToolCallEvent, TurnResult, Usage)

logger = logging.getLogger(__name__)

_STATE = {
    SessionState.NEW: pb.SESSION_STATE_NEW,
    SessionState.RESIDENT: pb.SESSION_STATE_RESIDENT,
    SessionState.SWAPPED: pb.SESSION_STATE_SWAPPED,
    SessionState.EVICTED: pb.SESSION_STATE_EVICTED,
    SessionState.CLOSED: pb.SESSION_STATE_CLOSED,
}


class NotFoundError(Exception):
    pass


class UnauthenticatedError(Exception):
    pass


# --- proto <-> python -------------------------------------------------------------------------------
def messages_from_proto(messages: Sequence[pb.Message]) -> list[dict[str, Any]]:
    out = []
    for m in messages:
        d: dict[str, Any] = {"role": m.role, "content": m.content or None}
        if m.tool_calls:
            d["tool_calls"] = [{"id": tc.id, "type": "function", "function": {"name": tc.name, "arguments": tc.arguments}}
                               for tc in m.tool_calls]
        if m.tool_call_id:
            d["tool_call_id"] = m.tool_call_id
        if m.name:
            d["name"] = m.name
        if m.token_ids:
            d["token_ids"] = list(m.token_ids)
        out.append(d)
    return out


def tools_from_proto(tools: Sequence[pb.Tool]) -> Optional[list[dict[str, Any]]]:
    out = []
    for i, t in enumerate(tools):
        params = parse_json_object(t.parameters_json, f"tools[{i}].parameters_json") if t.parameters_json else None
        fn: dict[str, Any] = {"name": t.name}  # OpenAI's key order (templates serialise tools as given)
        if t.description:
            fn["description"] = t.description
        fn["parameters"] = params
        out.append({"type": "function", "function": fn})
    return out or None


def message_to_proto(m: dict[str, Any]) -> pb.Message:
    msg = pb.Message(role=m.get("role", ""), content=m.get("content") or "", tool_call_id=m.get("tool_call_id", ""),
                     name=m.get("name", ""), token_ids=m.get("token_ids") or [])
    for tc in m.get("tool_calls") or []:
        fn = tc.get("function", {})
        args = fn.get("arguments", "")
        msg.tool_calls.add(id=tc.get("id", ""), name=fn.get("name", ""),
                           arguments=args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))
    return msg


def sampling_from_proto(sp: pb.SamplingParams, response_format: Optional[pb.ResponseFormat] = None,
                        tools: Optional[list[dict[str, Any]]] = None, tool_choice: str = "") -> SamplingParams:
    kw: dict[str, Any] = {"max_tokens": None}
    for name in ("temperature", "top_p", "top_k", "min_p", "max_tokens", "min_tokens", "seed", "presence_penalty",
                 "frequency_penalty", "repetition_penalty"):
        if sp.HasField(name):
            kw[name] = getattr(sp, name)
    if sp.stop:
        kw["stop"] = list(sp.stop)
    if sp.stop_token_ids:
        kw["stop_token_ids"] = list(sp.stop_token_ids)
    kw["ignore_eos"] = sp.ignore_eos
    if response_format is not None and response_format.type not in ("", "text"):
        kind = response_format.type
        if kind == "json_object":
            kw["json_object"] = True
        elif kind == "json_schema":
            if not response_format.json_schema:
                raise InvalidRequestError("response_format.json_schema is empty")
            kw["json_schema"] = parse_json_object(response_format.json_schema, "response_format.json_schema")
        elif kind == "regex":
            kw["regex"] = response_format.regex
        elif kind == "choice":
            kw["choice"] = list(response_format.choice)
        else:
            raise InvalidRequestError(f"response_format.type {kind!r} is not one of text, json_object, json_schema, "
                                      "regex, choice")
    if tool_choice and not tools:
        raise InvalidRequestError("tool_choice needs tools (declare them when creating the session)")
    if tools and tool_choice != "none":
        names = [t["function"]["name"] for t in tools]
        if tool_choice in ("", "auto", "required"):
            choice: Any = tool_choice or "auto"
        elif tool_choice in names:
            choice = {"type": "function", "function": {"name": tool_choice}}
        else:
            raise InvalidRequestError(f"tool_choice {tool_choice!r} is not auto, none, required or a declared tool "
                                      f"({', '.join(names)})")
        if not any(k in kw for k in ("json_object", "json_schema", "regex", "choice")):
            kw["tools"], kw["tool_choice"] = tools, choice
    try:
        return SamplingParams(**kw)
    except ValueError as e:
        raise InvalidRequestError(f"sampling: {e}") from None


def snapshot_to_proto(s: SessionSnapshot) -> pb.SessionInfo:
    info = pb.SessionInfo(
        session_id=s.session_id, model=s.model, adapter=s.adapter or "", state=_STATE[s.state], num_tokens=s.num_tokens,
        num_kv_tokens=s.num_kv_tokens, num_pages=s.num_pages, num_swapped_pages=s.num_swapped_pages,
        num_turns=s.num_turns, num_messages=s.num_messages, busy=s.busy, parent_id=s.parent_id or "",
        created_at=s.created_at, last_active_at=s.last_active_at, expires_at=s.expires_at, ttl_seconds=s.ttl_seconds,
        metadata=s.metadata, raw_tokens=s.raw_tokens, token_ids=s.token_ids or [])
    for m in s.messages or []:
        info.messages.append(message_to_proto(m))
    return info


def usage_to_proto(u: Usage) -> pb.Usage:
    return pb.Usage(prompt_tokens=u.prompt_tokens, cached_tokens=u.cached_tokens, prefilled_tokens=u.prefilled_tokens,
                    completion_tokens=u.completion_tokens, swapped_in_tokens=u.swapped_in_tokens)


def timing_to_proto(t: Timing) -> pb.Timing:
    return pb.Timing(queue_ms=t.queue_ms, prefill_ms=t.prefill_ms, ttft_ms=t.ttft_ms, decode_ms=t.decode_ms,
                     total_ms=t.total_ms, swap_in_ms=t.swap_in_ms, swap_wait_ms=t.swap_wait_ms)


def timing_from_metrics(metrics: Any, received_at: float) -> Timing:
    t = Timing(total_ms=(time.monotonic() - received_at) * 1e3)
    if metrics is None:
        return t
    if metrics.first_scheduled_time is not None:
        t.queue_ms = (metrics.first_scheduled_time - metrics.arrival_time) * 1e3
        if metrics.first_token_time is not None:
            t.prefill_ms = (metrics.first_token_time - metrics.first_scheduled_time) * 1e3
    if metrics.first_token_time is not None:
        t.ttft_ms = (metrics.first_token_time - received_at) * 1e3
        if metrics.finished_time is not None:
            t.decode_ms = (metrics.finished_time - metrics.first_token_time) * 1e3
    return t


# --- errors -----------------------------------------------------------------------------------------
def status_of(e: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(e, SessionError):
        return getattr(grpc.StatusCode, e.code), str(e)
    if isinstance(e, NotFoundError):
        return grpc.StatusCode.NOT_FOUND, str(e)
    if isinstance(e, (InvalidRequestError, ValueError)):
        return grpc.StatusCode.INVALID_ARGUMENT, str(e)
    if isinstance(e, (QueueFullError, TenantLimitError)):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)
    if isinstance(e, UnauthenticatedError):
        return grpc.StatusCode.UNAUTHENTICATED, str(e)
    if isinstance(e, EngineDeadError):
        return grpc.StatusCode.UNAVAILABLE, str(e)
    return grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}"


@contextlib.asynccontextmanager
async def _errors(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    try:
        yield
    except (grpc.aio.AbortError, GeneratorExit):
        raise
    except Exception as e:  # noqa: BLE001 - every failure becomes a status with a message
        code, msg = status_of(e)
        if code == grpc.StatusCode.INTERNAL:
            logger.exception("RPC failed")
        await context.abort(code, msg)


# --- the service ------------------------------------------------------------------------------------
class AgentServicer(pb_grpc.AgentServiceServicer):
    def __init__(self, async_engine: AsyncEngine, store: SessionStore, tenants: Optional[Tenants] = None) -> None:
        self.aeng = async_engine
        self.engine = async_engine.engine
        self.store = store
        self.tenants = tenants or Tenants()
        self.serving = True
        self._ids = itertools.count()

    def _tenant(self, context: grpc.aio.ServicerContext) -> Tenant:
        tenant = self.tenants.authenticate(presented_key(context.invocation_metadata()))
        if tenant is None:  # ApiKeyInterceptor turns these away first; this servicer never trusts that alone
            raise UnauthenticatedError(_UNAUTHENTICATED)
        return tenant

    @contextlib.asynccontextmanager
    async def _request_slot(self, context: grpc.aio.ServicerContext) -> AsyncIterator[Tenant]:
        """The caller's tenant, holding one of its request slots while a generation RPC runs."""
        tenant = self._tenant(context)
        with self.tenants.request_slot(tenant):
            yield tenant

    def _check_model(self, model: str) -> None:
        if model and model not in self.engine.config.model.accepted_model_names():
            raise NotFoundError(f"model {model!r} is not served here; this server serves {self.engine.model_name!r}")

    def _check_adapter(self, adapter: str) -> None:
        if adapter and adapter not in self._adapters():
            raise NotFoundError(f"adapter {adapter!r} is not loaded" + (
                "" if self.engine.config.lora.enable_lora else " (LoRA is not enabled on this server)"))

    def _adapters(self) -> list[str]:
        return adapter_names(self.engine.lora_manager)

    def _check_tools(self, tools: Sequence[pb.Tool]) -> None:
        """Tool count and each tool's schema, on the JSON text before it is parsed."""
        limits = self.store.render_pool.limits
        L.check_count(len(tools), limits.max_tools, "tools", "max-tools")
        for i, t in enumerate(tools):
            if t.parameters_json:
                L.check_schema(t.parameters_json, f"tools[{i}].parameters_json", limits)

    def _check_edge(self, messages: list[dict[str, Any]], sampling: Optional[pb.SamplingParams] = None,
                    response_format: Optional[pb.ResponseFormat] = None) -> None:
        """Per-request limits and string validity, before any work that grows with the request."""
        limits = self.store.render_pool.limits
        L.check_count(len(messages), limits.max_messages, "messages", "max-messages")
        L.check_utf8(messages, "messages")
        if sampling is not None:
            L.check_stop(list(sampling.stop), limits, "sampling.stop")
        if response_format is not None and response_format.json_schema:
            L.check_schema(response_format.json_schema, "response_format.json_schema", limits)

    async def CreateSession(self, request: pb.CreateSessionRequest, context: grpc.aio.ServicerContext) -> pb.SessionInfo:
        async with _errors(context):
            tenant = self._tenant(context)
            self._check_model(request.model)
            self._check_adapter(request.adapter)
            self._check_tools(request.tools)
            messages, tools = messages_from_proto(request.messages), tools_from_proto(request.tools)
            self._check_edge(messages)
            snap = await self.store.create(
                messages, tools=tools,
                ttl_seconds=request.ttl_seconds, cache_salt=tenant.cache_salt(request.cache_salt or None),
                adapter=request.adapter or None, raw_tokens=request.raw_tokens, metadata=dict(request.metadata),
                tenant=tenant.name)
            return snapshot_to_proto(snap)
        raise AssertionError("unreachable")

    async def Turn(self, request: pb.TurnRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.TurnEvent]:
        received = time.monotonic()
        async with _errors(context), self._request_slot(context) as tenant:
            tools = self.store.session_tools(request.session_id, tenant.name)
            messages = messages_from_proto(request.messages)
            self._check_edge(messages, request.sampling,
                             request.response_format if request.HasField("response_format") else None)
            params = sampling_from_proto(request.sampling, request.response_format if request.HasField(
                "response_format") else None, tools, request.tool_choice)
            ids = request.return_token_ids
            async with contextlib.aclosing(self.store.turn(
                    request.session_id, messages, params,
                    expected_next_turn_ms=request.expected_next_turn_ms, priority=request.priority,
                    received_at=received, tenant=tenant.name)) as events:
                async for ev in events:
                    if isinstance(ev, TextEvent):
                        if ev.text or (ids and ev.token_ids):
                            yield pb.TurnEvent(text=pb.TextDelta(text=ev.text, token_ids=ev.token_ids if ids else []))
                    elif isinstance(ev, ToolCallEvent):
                        yield pb.TurnEvent(tool_call=pb.ToolCallDelta(index=ev.index, id=ev.id, name=ev.name,
                                                                      arguments_delta=ev.arguments_delta))
                    elif isinstance(ev, TurnResult):
                        yield pb.TurnEvent(done=pb.TurnDone(
                            message=message_to_proto(ev.message), finish_reason=ev.finish_reason,
                            usage=usage_to_proto(ev.usage), timing=timing_to_proto(ev.timing),
                            token_ids=ev.token_ids if ids else [],
                            prompt_token_ids=ev.prompt_token_ids if ids else [],
                            session=snapshot_to_proto(ev.session)))

    async def ForkSession(self, request: pb.ForkSessionRequest, context: grpc.aio.ServicerContext) -> pb.SessionInfo:
        async with _errors(context):
            snap = await self.store.fork(request.session_id, ttl_seconds=request.ttl_seconds,
                                         metadata=dict(request.metadata) if request.metadata else None,
                                         tenant=self._tenant(context).name)
            return snapshot_to_proto(snap)
        raise AssertionError("unreachable")

    async def GetSession(self, request: pb.GetSessionRequest, context: grpc.aio.ServicerContext) -> pb.SessionInfo:
        async with _errors(context):
            return snapshot_to_proto(await self.store.get(request.session_id, request.include_messages,
                                                          request.include_token_ids,
                                                          tenant=self._tenant(context).name))
        raise AssertionError("unreachable")

    async def ListSessions(self, request: pb.ListSessionsRequest,
                           context: grpc.aio.ServicerContext) -> pb.ListSessionsResponse:
        async with _errors(context):
            sessions = await self.store.list(tenant=self._tenant(context).name)
            return pb.ListSessionsResponse(sessions=[snapshot_to_proto(s) for s in sessions])
        raise AssertionError("unreachable")

    async def CloseSession(self, request: pb.CloseSessionRequest,
                           context: grpc.aio.ServicerContext) -> pb.CloseSessionResponse:
        async with _errors(context):
            snap = await self.store.close(request.session_id, tenant=self._tenant(context).name)
            return pb.CloseSessionResponse(session=snapshot_to_proto(snap))
        raise AssertionError("unreachable")

    async def Generate(self, request: pb.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateEvent]:
        received = time.monotonic()
        async with _errors(context), self._request_slot(context) as tenant:
            self._check_model(request.model)
            self._check_adapter(request.adapter)
            given = [bool(request.prompt), bool(request.prompt_token_ids), bool(request.messages)]
            if sum(given) != 1:
                raise InvalidRequestError("give exactly one of prompt, prompt_token_ids and messages")
            self._check_tools(request.tools)
            tools = tools_from_proto(request.tools)
            messages = messages_from_proto(request.messages)
            self._check_edge(messages, request.sampling,
                             request.response_format if request.HasField("response_format") else None)
            if tools is not None:
                tools = normalize_tools(tools)
            if request.tools and not request.messages:
                raise InvalidRequestError("tools need messages (they are rendered with the chat template)")
            params = sampling_from_proto(request.sampling, request.response_format if request.HasField(
                "response_format") else None, tools, request.tool_choice)
            # Rendering and tokenizing run in the render pool: the step thread only sees token ids.
            pool = self.store.render_pool
            prompt: list[int]
            if request.messages:
                if not R.has_chat_template(self.engine.tokenizer):
                    raise InvalidRequestError("this model has no chat template: send prompt or prompt_token_ids")
                msgs = normalize_messages(messages, SESSION_RULES, raw_tokens=False,
                                          vocab_size=self.engine.arch.vocab_size)
                pool.check_messages(msgs)
                prompt = await pool.run(lambda tok: pool.encode(
                    tok, pool.render(tok, msgs, tools, add_generation_prompt=True), "messages",
                    add_special_tokens=False))
            elif request.prompt_token_ids:
                prompt = list(request.prompt_token_ids)
            else:
                if self.engine.tokenizer is None:
                    raise InvalidRequestError("this model has no tokenizer: send prompt_token_ids")
                L.check_utf8(request.prompt, "prompt")
                pool.check_chars(len(request.prompt), "prompt")
                text = request.prompt
                prompt = await pool.run(lambda tok: pool.encode(tok, text, "prompt", add_special_tokens=True))
            rid = f"gen-{next(self._ids)}-{int(received * 1e6)}"
            reply: Optional[ReplyStream] = None
            async with contextlib.aclosing(self.aeng.generate(
                    rid, prompt, params, priority=request.priority,
                    cache_salt=tenant.cache_salt(request.cache_salt or None),
                    lora_name=request.adapter or None)) as outs:
                async for out in outs:
                    if reply is None:
                        reply = ReplyStream(self.engine.tokenizer, out.prompt_token_ids, params, tools)
                    comp = out.outputs[0]
                    text, calls = reply.feed(out)
                    for c in calls:
                        yield pb.GenerateEvent(tool_call=pb.ToolCallDelta(
                            index=c.index, id=c.id, name=c.name, arguments_delta=c.arguments_delta))
                    if text or (request.return_token_ids and comp.delta_token_ids):
                        yield pb.GenerateEvent(text=pb.TextDelta(
                            text=text, token_ids=comp.delta_token_ids if request.return_token_ids else []))
                    if out.finished and (out.error or comp.finish_reason == "error"):
                        if not comp.token_ids:
                            raise InvalidRequestError(out.error or "the request failed")
                        raise RuntimeError(out.error or "the request failed")
                    if out.finished:
                        m = out.metrics
                        usage = pb.Usage(prompt_tokens=len(out.prompt_token_ids),
                                         cached_tokens=m.num_cached_tokens if m else 0,
                                         prefilled_tokens=m.num_prefilled_tokens if m else 0,
                                         completion_tokens=len(comp.token_ids))
                        done = pb.GenerateDone(text=comp.text, token_ids=comp.token_ids,
                                               finish_reason=comp.finish_reason or "stop", usage=usage,
                                               timing=timing_to_proto(timing_from_metrics(m, received)))
                        content, tool_calls = reply.final()
                        if content is not None:
                            done.text = content
                        for c in tool_calls:
                            done.tool_calls.add(id=c["id"], name=c["function"]["name"],
                                                arguments=c["function"]["arguments"])
                        if tool_calls and done.finish_reason == "stop":
                            done.finish_reason = "tool_calls"
                        yield pb.GenerateEvent(done=done)

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        e = self.engine
        return pb.ListModelsResponse(models=[pb.ModelInfo(
            id=name, max_model_len=e.max_model_len, root=str(e.model_path or e.config.model.model),
            adapters=self._adapters(), has_chat_template=R.has_chat_template(e.tokenizer),
            vocab_size=e.arch.vocab_size) for name in e.config.model.served_model_names()])

    async def LoadAdapter(self, request: pb.LoadAdapterRequest, context: grpc.aio.ServicerContext) -> pb.AdapterInfo:
        async with _errors(context):
            mgr = self.engine.lora_manager
            if mgr is None:
                await context.abort(grpc.StatusCode.UNIMPLEMENTED, "LoRA adapters are not supported by this server "
                                    "build yet" if self.engine.config.lora.enable_lora else
                                    "LoRA is not enabled (start the server with --enable-lora)")
            if not request.name or not request.path:
                raise InvalidRequestError("LoadAdapter needs a name and a path")
            await self.aeng.run(lambda: mgr.load(request.name, request.path))  # type: ignore[union-attr]
            return pb.AdapterInfo(name=request.name, path=request.path)
        raise AssertionError("unreachable")

    async def UnloadAdapter(self, request: pb.UnloadAdapterRequest,
                            context: grpc.aio.ServicerContext) -> pb.UnloadAdapterResponse:
        async with _errors(context):
            self._check_adapter(request.name)
            mgr = self.engine.lora_manager
            if mgr is None:
                await context.abort(grpc.StatusCode.UNIMPLEMENTED, "LoRA adapters are not supported by this server")
            await self.aeng.run(lambda: mgr.unload(request.name))  # type: ignore[union-attr]
            return pb.UnloadAdapterResponse()
        raise AssertionError("unreachable")

    async def Health(self, request: pb.HealthRequest, context: grpc.aio.ServicerContext) -> pb.HealthResponse:
        from agentserve import __version__

        live = live_engine_gauges(self.engine)  # now, not as of the last step (an idle engine does not step)
        counts = self.store.residency_counts()
        return pb.HealthResponse(
            status=pb.HealthResponse.SERVING if self.serving else pb.HealthResponse.NOT_SERVING,
            model=self.engine.model_name, num_running=live.num_running, num_waiting=live.num_waiting,
            kv_pages_used=live.kv_pages_used, kv_pages_total=live.kv_pages_total,
            num_sessions=len(self.store), sessions_resident=counts["resident"], sessions_swapped=counts["swapped"],
            sessions_evicted=counts["evicted"], swap_slots_used=self.store.num_swap_slots - self.store.num_free_swap_slots,
            swap_slots_total=self.store.num_swap_slots, prefix_cache_hit_rate=live.prefix_cache_hit_rate,
            version=__version__)


# --- API key ----------------------------------------------------------------------------------------
_UNAUTHENTICATED = "missing or wrong API key: send metadata 'authorization: Bearer <key>' or 'x-api-key: <key>'"


def presented_key(metadata: Optional[Sequence[tuple[str, Any]]]) -> Optional[str]:
    """The key in `authorization: Bearer <key>` or `x-api-key: <key>` metadata, if any."""
    for key, value in metadata or ():
        if isinstance(value, bytes):
            continue
        key = key.lower()
        if key == "authorization" and value.lower().startswith("bearer "):
            return value[7:].strip()
        if key == "x-api-key":
            return value.strip()
    return None


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Every RPC needs metadata `authorization: Bearer <key>` (or `x-api-key: <key>`) with a configured key."""

    def __init__(self, tenants: Tenants) -> None:
        self._tenants = tenants

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
                                handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        metadata = handler_call_details.invocation_metadata
        if handler is None or self._tenants.authenticate(presented_key(metadata)) is not None:
            return handler

        async def deny(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, _UNAUTHENTICATED)

        async def deny_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, _UNAUTHENTICATED)
            yield  # pragma: no cover

        kw = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(deny_stream, **kw)
        return grpc.unary_unary_rpc_method_handler(deny, **kw)


def add_to_server(server: grpc.aio.Server, servicer: AgentServicer) -> None:
    pb_grpc.add_AgentServiceServicer_to_server(servicer, server)
