"""AgentService over grpc.aio: sessions (sessions/store.py), stateless generation, models, health.

Every RPC maps errors to status codes with a readable message: NOT_FOUND (session, model, adapter),
INVALID_ARGUMENT (bad messages, roles, sampling, schema, over-long input, a per-request limit,
text that is not valid UTF-8), FAILED_PRECONDITION (a turn already running on the session; an adapter
in use), ALREADY_EXISTS (an adapter name taken: the base model's, or loaded without `replace`),
RESOURCE_EXHAUSTED (queue full; a message over --grpc-max-message-bytes), UNAUTHENTICATED (API key),
CANCELLED (the turn's session was closed), UNAVAILABLE (shutting down).

Tenants (service/tenants.py): the API key an RPC carries names its tenant. Sessions are the creating
tenant's: another tenant's session is NOT_FOUND on every call, and ListSessions lists only one's own,
in pages (service/paging.py: page sizes, and page tokens bound to the tenant).
A tenant's requests and sessions hash their KV pages under its own cache salt. Past a tenant's limit
of requests in flight, or the session limits, calls get RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from typing import Any, AsyncIterator, Awaitable, Callable, Optional, Sequence

import grpc

from agentserve import __version__
from agentserve.chat import limits as L
from agentserve.engine.async_engine import AsyncEngine
from agentserve.errors import (AdapterInUseError, AdapterNameTakenError, AdapterNotFoundError, ContextLengthError,
                               EngineDeadError, InvalidRequestError, LoRANotEnabledError, QueueFullError, SessionError)
from agentserve.engine.metrics import live_engine_gauges
from agentserve.service import agent_pb2 as pb
from agentserve.service import agent_pb2_grpc as pb_grpc
from agentserve.service.convert import (messages_from_proto, sampling_from_proto, snapshot_to_proto,
                                        template_kwargs_from_proto, tools_from_proto, turn_events_to_proto)
from agentserve.service.generate_events import generate_events
from agentserve.service.paging import PageTokens, page_size_of
from agentserve.service.tenants import ANONYMOUS, Tenant, TenantLimitError, Tenants
from agentserve.sessions.store import SessionStore
from agentserve.chat import render as R
from agentserve.chat.messages import SESSION_RULES, normalize_messages
from agentserve.chat.template_kwargs import checked_template_kwargs
from agentserve.chat.tools import normalize_tools
from agentserve.lora.interface import adapter_names

logger = logging.getLogger(__name__)


class NotFoundError(Exception):
    pass


class UnauthenticatedError(Exception):
    pass


# --- errors -----------------------------------------------------------------------------------------
def status_of(e: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(e, SessionError):
        return grpc.StatusCode[e.code], str(e)
    if isinstance(e, (NotFoundError, AdapterNotFoundError)):
        return grpc.StatusCode.NOT_FOUND, str(e)
    if isinstance(e, LoRANotEnabledError):
        return grpc.StatusCode.UNIMPLEMENTED, str(e)
    if isinstance(e, AdapterInUseError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(e)
    if isinstance(e, AdapterNameTakenError):
        return grpc.StatusCode.ALREADY_EXISTS, str(e)
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
        self.page_tokens = PageTokens()  # ListSessions' page tokens, valid while this server runs

    def _tenant(self, context: grpc.aio.ServicerContext) -> Tenant:
        tenant = self.tenants.authenticate(presented_key(context.invocation_metadata()))
        if tenant is None:  # ApiKeyInterceptor turns these away first; this servicer never trusts that alone
            raise UnauthenticatedError(_UNAUTHENTICATED)
        return tenant

    def _manager_tenant(self, context: grpc.aio.ServicerContext) -> Optional[str]:
        """The caller's tenant under API keys (adapters it loads are its to replace and unload); None without."""
        tenant = self._tenant(context)
        return None if tenant.name == ANONYMOUS else tenant.name

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
            vocab_size = self.engine.arch.vocab_size
            L.check_token_id_count(len(sampling.allowed_token_ids), vocab_size, "sampling.allowed_token_ids")
            L.check_token_id_count(len(sampling.stop_token_ids), vocab_size, "sampling.stop_token_ids")
            L.check_stop(list(sampling.stop), limits, "sampling.stop")
            L.check_bad_words(list(sampling.bad_words), limits, "sampling.bad_words")
        if response_format is not None and response_format.json_schema:
            L.check_schema(response_format.json_schema, "response_format.json_schema", limits)

    async def CreateSession(self, request: pb.CreateSessionRequest, context: grpc.aio.ServicerContext) -> pb.SessionInfo:
        async with _errors(context):
            tenant = self._tenant(context)
            self._check_model(request.model)
            self._check_adapter(request.adapter)
            self._check_tools(request.tools)
            L.check_metadata(request.metadata)
            messages, tools = messages_from_proto(request.messages), tools_from_proto(request.tools)
            self._check_edge(messages)
            snap = await self.store.create(
                messages, tools=tools,
                ttl_seconds=request.ttl_seconds, cache_salt=tenant.cache_salt(request.cache_salt or None),
                adapter=request.adapter or None, raw_tokens=request.raw_tokens, metadata=dict(request.metadata),
                tenant=tenant.name, chat_template_kwargs=template_kwargs_from_proto(request.chat_template_kwargs))
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
                "response_format") else None, tools, request.tool_choice, self.aeng.engine.generation_defaults.sampling)
            async with contextlib.aclosing(self.store.turn(
                    request.session_id, messages, params,
                    expected_next_turn_ms=request.expected_next_turn_ms, priority=request.priority,
                    received_at=received, tenant=tenant.name)) as events:
                async for ev in events:
                    for event in turn_events_to_proto(ev, request.return_token_ids, params.logprobs or 0):
                        yield event

    async def ForkSession(self, request: pb.ForkSessionRequest, context: grpc.aio.ServicerContext) -> pb.SessionInfo:
        async with _errors(context):
            L.check_metadata(request.metadata)
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
            tenant = self._tenant(context).name
            page_size = page_size_of(request.page_size)
            after = self.page_tokens.decode(request.page_token, tenant) if request.page_token else None
            listed = await self.store.list(tenant=tenant, after=after, limit=page_size + 1)  # +1: is there more?
            page = listed[:page_size]
            return pb.ListSessionsResponse(sessions=[snapshot_to_proto(s) for s in page],
                                           next_page_token=self.page_tokens.next_page_token(
                                               page, len(listed) > page_size, tenant))
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
            if not any(given):  # proto3 cannot tell an empty prompt from an absent one
                raise InvalidRequestError("the prompt is empty: give exactly one of prompt (non-empty text), "
                                          "prompt_token_ids and messages")
            if sum(given) > 1:
                raise InvalidRequestError(f"give exactly one of prompt, prompt_token_ids and messages, not {sum(given)}")
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
                "response_format") else None, tools, request.tool_choice, self.aeng.engine.generation_defaults.sampling)
            prompt = await self._generate_prompt(request, messages, tools)
            rid = f"gen-{next(self._ids)}-{int(received * 1e6)}"
            outs = self.aeng.generate(rid, prompt, params, priority=request.priority,
                                      cache_salt=tenant.cache_salt(request.cache_salt or None),
                                      lora_name=request.adapter or None)
            async with contextlib.aclosing(outs):
                async for event in generate_events(self.engine, outs, params, tools, chat=bool(request.messages),
                                                   return_token_ids=request.return_token_ids, received=received):
                    yield event

    async def _generate_prompt(self, request: pb.GenerateRequest, messages: list[dict[str, Any]],
                               tools: Optional[list[dict[str, Any]]]) -> list[int]:
        """Generate's prompt tokens. Rendering and tokenizing run in the render pool: the step thread
        only sees token ids."""
        pool = self.store.render_pool
        if request.messages:
            if not R.has_chat_template(self.engine.tokenizer):
                raise InvalidRequestError("this model has no chat template: send prompt or prompt_token_ids")
            msgs = normalize_messages(messages, SESSION_RULES, raw_tokens=False,
                                      vocab_size=self.engine.arch.vocab_size)
            pool.check_messages(msgs)
            kwargs = checked_template_kwargs(template_kwargs_from_proto(request.chat_template_kwargs))
            return await pool.run(lambda tok: pool.encode(
                tok, pool.render(tok, msgs, tools, add_generation_prompt=True, template_kwargs=kwargs), "messages",
                add_special_tokens=False))
        if request.chat_template_kwargs:
            raise InvalidRequestError("chat_template_kwargs apply to messages (the chat template); this request sends a "
                                      "prompt")
        if request.prompt_token_ids:
            num_ids = len(request.prompt_token_ids)  # by its length first: list() of millions of ids takes seconds
            if num_ids >= self.engine.max_model_len:
                raise ContextLengthError(f"the prompt has {num_ids} tokens; max_model_len is {self.engine.max_model_len} "
                                         "(prompt plus output must fit)", "prompt_token_ids", num_ids,
                                         self.engine.max_model_len)
            return list(request.prompt_token_ids)
        if self.engine.tokenizer is None:
            raise InvalidRequestError("this model has no tokenizer: send prompt_token_ids")
        L.check_utf8(request.prompt, "prompt")
        pool.check_chars(len(request.prompt), "prompt")
        text = request.prompt
        return await pool.run(lambda tok: pool.encode(tok, text, "prompt", add_special_tokens=True))

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        e = self.engine
        return pb.ListModelsResponse(models=[pb.ModelInfo(
            id=name, max_model_len=e.max_model_len, root=str(e.model_path or e.config.model.model),
            adapters=self._adapters(), has_chat_template=R.has_chat_template(e.tokenizer),
            vocab_size=e.arch.vocab_size) for name in e.config.model.served_model_names()])

    async def LoadAdapter(self, request: pb.LoadAdapterRequest, context: grpc.aio.ServicerContext) -> pb.AdapterInfo:
        async with _errors(context):
            tenant = self._manager_tenant(context)
            if not request.name or not request.path:
                raise InvalidRequestError("LoadAdapter needs a name and a path (a PEFT adapter directory)")
            control = self.engine.lora
            # Read off the event loop and the step thread (grows with the adapter); bound on the step thread.
            prepared = await asyncio.to_thread(control.read, request.name, request.path, request.replace, tenant)
            await self.aeng.run(lambda: control.install(prepared, request.replace, tenant))
            return pb.AdapterInfo(name=request.name, path=request.path)
        raise AssertionError("unreachable")

    async def UnloadAdapter(self, request: pb.UnloadAdapterRequest,
                            context: grpc.aio.ServicerContext) -> pb.UnloadAdapterResponse:
        async with _errors(context):
            tenant = self._manager_tenant(context)
            if not request.name:
                raise InvalidRequestError("UnloadAdapter needs the name of a loaded adapter")
            control = self.engine.lora
            await self.aeng.run(lambda: control.unload(request.name, drain=request.drain, tenant=tenant))
            return pb.UnloadAdapterResponse()
        raise AssertionError("unreachable")

    async def Health(self, request: pb.HealthRequest, context: grpc.aio.ServicerContext) -> pb.HealthResponse:
        live = live_engine_gauges(self.engine)  # now, not as of the last step (an idle engine does not step)
        counts = self.store.residency_counts()
        return pb.HealthResponse(
            status=(pb.HealthResponse.SERVING if self.serving and self.aeng.is_running()
                    else pb.HealthResponse.NOT_SERVING),
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
