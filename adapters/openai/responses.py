"""POST /v1/responses (create, JSON or SSE), GET /v1/responses/{id} (retrieve), DELETE
/v1/responses/{id}, GET /v1/responses/{id}/input_items, POST /v1/responses/{id}/cancel: the Responses
API on resident sessions (background responses: responses_background.py).

Every response runs as a session turn (sessions/turns.py, as gRPC Turn does): the request's
instructions, input items and function tools are rendered through the chat template, and the reply
is parsed into output text and function calls in the model's tool format. `previous_response_id`
continues on the session behind the earlier response, so the continuation prefills only its new
items (its `usage.input_tokens_details.cached_tokens` covers the whole earlier conversation). A
stored response lives as long as its session (the session TTL); `store: false` responses are not
kept (their session is closed after the reply, or, when continuing a stored one, a copy-on-write
fork of it is). See responses_store.py for when a continuation starts a new session instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any, AsyncGenerator, AsyncIterator, Optional

from agentserve.adapters.openai import responses_items as I
from agentserve.adapters.openai.protocol import OpenAIError
from agentserve.adapters.openai.responses_background import BackgroundJob, BackgroundResponses
from agentserve.adapters.openai.responses_events import ResponseEvents, response_body, responses_usage
from agentserve.adapters.openai.responses_store import ResponsesStore, StoredResponse
from agentserve.adapters.openai.responses_truncation import fit_conversation, reply_room
from agentserve.adapters.openai.serving import ClientDisconnected, OpenAIServing, now, param_of, wait_disconnect
from agentserve.chat import limits as L
from agentserve.chat.tool_schemas import check_tool_schemas
from agentserve.chat.tools import check_tool_choice
from agentserve.errors import FieldError, SessionError
from agentserve.sampling_params import SamplingParams
from agentserve.service.tenants import Tenant, held_slot_of_scope, tenant_of_scope
from agentserve.sessions.store import SessionStore
from agentserve.sessions.types import TextEvent, ToolCallEvent, TurnEvent, TurnResult

_SESSION_STATUS = {"NOT_FOUND": 404, "FAILED_PRECONDITION": 409, "RESOURCE_EXHAUSTED": 429, "CANCELLED": 499}


class _Turn:
    """One response's plan: the session it runs on, the messages its turn adds, what it continues."""

    def __init__(self, session_id: str, messages: list[dict[str, Any]], close_after: bool,
                 claimed: Optional[StoredResponse]) -> None:
        self.session_id, self.messages, self.close_after, self.claimed = session_id, messages, close_after, claimed


class ResponsesEndpoint:
    def __init__(self, serving: OpenAIServing, session_store: Optional[SessionStore]) -> None:
        self.s = serving
        self._sessions = session_store
        self._owned_sessions: Optional[SessionStore] = None
        self._store: Optional[ResponsesStore] = None
        self.closing: set[asyncio.Future[None]] = set()  # sessions being closed after their responses
        self.background = BackgroundResponses()

    # --- the session store (the server's, or one of our own when the app runs without one) ----------
    @property
    def sessions(self) -> SessionStore:
        if self._sessions is None:
            if self.s.engine.on_retained is not None:  # a store the app was not given: it cannot share it
                raise OpenAIError(503, "the Responses API needs the server's session store (pass session_store "
                                       "to create_app)", code="sessions_unavailable")
            store = self._owned_sessions = SessionStore(self.s.aeng, render_pool=self.s.render_pool)
            store.start()
            self._sessions = store
        return self._sessions

    @property
    def store(self) -> ResponsesStore:
        if self._store is None:
            self._store = ResponsesStore(self.sessions)
        return self._store

    async def close(self) -> None:
        """Cancels the background responses still running, and closes the session store this
        endpoint made (none when the server gave it one)."""
        await self.background.cancel_all()
        store, self._owned_sessions = self._owned_sessions, None
        if store is not None:
            await store.stop()
            await store.close_all()
            store.detach()

    # --- request -> turn -----------------------------------------------------------------------------
    def _check(self, req: I.ResponsesRequest) -> tuple[Optional[list[dict[str, Any]]], Any]:
        L.check_utf8(req.model_dump(exclude_none=True), "")
        I.check_server_state_fields(req)
        if req.background and req.store is False:  # OpenAI's rule: a background response is fetched by its id
            raise OpenAIError(400, "background: true needs store: true (a background response is retrieved by "
                                   "its id); drop store: false or background", param="background")
        if req.metadata:
            L.check_metadata(req.metadata)  # stored with the response and returned by every retrieve
        tok = self.s.need_tokenizer()
        if not tok.chat_template:
            raise OpenAIError(400, "this model has no chat template: use /v1/completions", param="input")
        tools = I.chat_tools(req.tools)
        try:
            L.check_tools(tools, self.s.limits)
            choice = check_tool_choice(tools, I.chat_tool_choice(req.tool_choice))
            if tools and choice != "none":
                check_tool_schemas(tools)
        except FieldError as e:
            raise I.responses_tool_field_error(e) from None
        fmt = (req.text or {}).get("format")
        if isinstance(fmt, dict) and isinstance(fmt.get("schema"), dict):
            L.check_schema(fmt["schema"], "text.format.schema", self.s.limits)
        if req.truncation not in (None, "auto", "disabled"):
            raise OpenAIError(400, f"truncation must be 'auto' or 'disabled', got {req.truncation!r}", param="truncation")
        if req.max_output_tokens is not None and req.max_output_tokens < 1:
            raise OpenAIError(400, f"max_output_tokens must be at least 1, got {req.max_output_tokens}",
                              param="max_output_tokens")
        drop_tools = choice == "none" and self.s.limits.exclude_tools_when_tool_choice_none  # vLLM's flag
        return (None if drop_tools else tools), choice

    def _params(self, req: I.ResponsesRequest, tools: Optional[list[dict[str, Any]]], choice: Any) -> SamplingParams:
        kw = self.s.with_model_defaults(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k)
        kw.update(max_tokens=req.max_output_tokens, seed=req.seed, ignore_eos=req.ignore_eos)
        kw.update(I.text_format_kwargs(req.text))
        if tools and choice != "none":
            kw.update(tools=tools, tool_choice=choice, parallel_tool_calls=req.parallel_tool_calls is not False)
        elif tools:
            kw["tool_choice"] = "none"  # the session's tools are rendered, but no call is parsed
        try:
            return SamplingParams(**kw)
        except (ValueError, TypeError) as e:
            msg = str(e)
            param = param_of(msg)
            raise OpenAIError(400, msg, param="max_output_tokens" if param == "max_tokens" else param) from None

    async def _fitted(self, req: I.ResponsesRequest, prev: Optional[StoredResponse], new_messages: list[dict[str, Any]],
                      tools: Optional[list[dict[str, Any]]]) -> Optional[list[dict[str, Any]]]:
        """truncation "auto": the conversation with its oldest turns dropped, when it does not fit whole."""
        system = [{"role": "system", "content": req.instructions}] if req.instructions else []
        whole = system + (prev.conversation() if prev is not None else []) + new_messages
        limit = self.s.engine.max_model_len
        return await fit_conversation(self.s.render_pool, whole, tools, limit - reply_room(req.max_output_tokens, limit),
                                      self.s.engine.arch.vocab_size)

    async def _plan(self, req: I.ResponsesRequest, tenant: Tenant, prev: Optional[StoredResponse],
                    new_messages: list[dict[str, Any]], tools: Optional[list[dict[str, Any]]], render_key: str,
                    adapter: Optional[str], fitted: Optional[list[dict[str, Any]]]) -> _Turn:
        keep = req.store is not False
        if fitted is None and prev is not None and prev.render_key == render_key and not prev.continued:
            snap = await self.sessions.get(prev.session_id, tenant=tenant.name)
            # Checked again after the await: only one continuation may take the session's tip.
            if snap.num_turns == prev.turn and not snap.busy and not prev.continued:
                if keep:
                    prev.continued = True
                    return _Turn(prev.session_id, new_messages, False, prev)
                child = await self.sessions.fork(prev.session_id, tenant=tenant.name)
                return _Turn(child.session_id, new_messages, True, None)
        history = prev.conversation() if prev is not None else []
        system = [{"role": "system", "content": req.instructions}] if req.instructions else []
        snap = await self.sessions.create([], tools=tools, cache_salt=tenant.cache_salt(None), adapter=adapter,
                                          model=req.model or self.s.model_name, tenant=tenant.name,
                                          stored_response=True)
        return _Turn(snap.session_id, fitted if fitted is not None else system + history + new_messages, not keep, None)

    async def create(self, req: I.ResponsesRequest, raw_request: Any) -> Any:
        tenant = tenant_of_scope(raw_request.scope)
        adapter = self.s.resolve_model(req.model)
        tools, choice = self._check(req)
        params = self._params(req, tools, choice)
        items = self.store.resolve_references(I.normalize_input(req.input), tenant.name)
        prev = None
        if req.previous_response_id:
            self.background.check_not_running(req.previous_response_id, tenant.name, "previous_response_id")
            prev = self.store.get(req.previous_response_id, tenant.name, "previous_response_id")
        new_messages = I.input_messages(items, prev.call_names() if prev is not None else None)
        if not new_messages:
            raise OpenAIError(400, "input must contain at least one item", param="input")
        # The adapter's key (id + load generation), not only its name: after a reload of the name, the
        # earlier response's session holds KV of the old weights, so a continuation starts a new session.
        render_key = json.dumps([req.instructions, tools, adapter, self.s.engine.lora.resolve(adapter)], sort_keys=True)
        self.s.check_queue(1)
        try:
            fitted = await self._fitted(req, prev, new_messages, tools) if req.truncation == "auto" else None
            plan = await self._plan(req, tenant, prev, new_messages, tools, render_key, adapter, fitted)
        except Exception as e:  # noqa: BLE001 - session errors -> HTTP statuses
            raise self.http_error(e) from None
        run = _ResponseRun(self, req, tenant, plan, params, prev, new_messages, items, render_key)
        if req.background:
            job = self.background.start(run, held_slot_of_scope(raw_request.scope))
            return job.follow(-1) if req.stream else job.body
        if req.stream:
            return await run.stream()
        return await run.full(raw_request)

    def http_error(self, e: BaseException) -> BaseException:
        if isinstance(e, SessionError):
            status = _SESSION_STATUS.get(e.code, 500)
            return OpenAIError(status, str(e), code=e.code.lower())
        return self.s.engine_error(e)

    # --- retrieve / delete / input_items ------------------------------------------------------------
    def _job(self, response_id: str, raw_request: Any) -> Optional[BackgroundJob]:
        """The background job of that id, while its record is kept and unless it completed: a completed
        one is a stored response (which expires with its session)."""
        job = self.background.get(response_id, tenant_of_scope(raw_request.scope).name)
        if job is None or (job.finished and job.body["status"] in ("completed", "incomplete")):
            return None
        return job

    def retrieve(self, response_id: str, raw_request: Any, stream: bool = False,
                 starting_after: Optional[int] = None) -> Any:
        """The response; with stream=true (a background response's), its events after `starting_after`."""
        tenant = tenant_of_scope(raw_request.scope).name
        if stream:
            job = self.background.get(response_id, tenant)
            if job is None:
                self.store.get(response_id, tenant)  # 404 for an unknown id
                raise OpenAIError(400, "stream=true replays a background response's events; this response was "
                                       "not created with background: true (or its events are no longer kept)",
                                  param="stream")
            if starting_after is not None and starting_after < -1:
                raise OpenAIError(400, f"starting_after must be a sequence number (>= 0), got {starting_after}",
                                  param="starting_after")
            return job.follow(-1 if starting_after is None else starting_after)
        job = self._job(response_id, raw_request)
        if job is not None:
            return job.snapshot()
        return self.store.get(response_id, tenant).body

    async def cancel(self, response_id: str, raw_request: Any) -> dict[str, Any]:
        tenant = tenant_of_scope(raw_request.scope).name
        job = self.background.get(response_id, tenant)
        if job is None:
            self.store.get(response_id, tenant)  # 404 for an unknown id
            raise OpenAIError(400, "Cannot cancel a synchronous response.", param="response_id")
        return await self.background.cancel(job)

    async def delete(self, response_id: str, raw_request: Any) -> dict[str, Any]:
        tenant = tenant_of_scope(raw_request.scope)
        job = self.background.get(response_id, tenant.name)
        if job is not None:
            await self.background.drop(job)
            if job.body["status"] not in ("completed", "incomplete"):  # never stored
                return {"id": response_id, "object": "response", "deleted": True}
        unused_session = self.store.remove(response_id, tenant.name)
        if unused_session is not None:
            with contextlib.suppress(SessionError):
                await self.sessions.close(unused_session, tenant=tenant.name)
        return {"id": response_id, "object": "response", "deleted": True}

    def input_items(self, response_id: str, raw_request: Any, limit: int = 20, order: str = "desc",
                    after: Optional[str] = None) -> dict[str, Any]:
        job = self._job(response_id, raw_request)
        items = job.run.items if job is not None else \
            self.store.get(response_id, tenant_of_scope(raw_request.scope).name).input_items
        return I.input_items_page(items, limit, order, after)


class _ResponseRun:
    """One response: runs its turn, answers it whole or as events, stores it."""

    def __init__(self, endpoint: ResponsesEndpoint, req: I.ResponsesRequest, tenant: Tenant, plan: _Turn,
                 params: SamplingParams, prev: Optional[StoredResponse], new_messages: list[dict[str, Any]],
                 items: list[dict[str, Any]], render_key: str) -> None:
        self.e, self.req, self.tenant, self.plan, self.params = endpoint, req, tenant, plan, params
        self.prev, self.new_messages, self.items, self.render_key = prev, new_messages, items, render_key
        self.id = I.new_id("resp")
        self.created = now()
        self.model = req.model or endpoint.s.model_name
        self.committed = False
        self.writer: Optional[ResponseEvents] = None  # the stream's events, once streaming

    def body(self, status: str) -> dict[str, Any]:
        return self._body(status, [], None)

    def _body(self, status: str, output: list[dict[str, Any]], result: Optional[TurnResult]) -> dict[str, Any]:
        usage = None
        if result is not None:
            u = result.usage
            usage = responses_usage(u.prompt_tokens, u.cached_tokens, u.completion_tokens, u.reasoning_tokens)
        reason = "max_output_tokens" if result is not None and result.finish_reason == "length" else None
        return response_body(self.id, self.req, self.model, self.created, status=status, output=output,
                             usage=usage, incomplete_reason=reason)

    def _finish(self, result: TurnResult, output: Optional[list[dict[str, Any]]] = None) -> dict[str, Any]:
        status = "incomplete" if result.finish_reason == "length" else "completed"
        body = self._body(status, I.output_items(result.message, status, result.parts) if output is None else output,
                          result)
        reply = {k: v for k, v in result.message.items() if k in ("role", "content", "tool_calls")}
        self.committed = True
        if self.req.store is not False:
            self.e.store.add(StoredResponse(
                response_id=self.id, tenant=self.tenant.name, session_id=self.plan.session_id,
                turn=result.session.num_turns, render_key=self.render_key, parent=self.prev,
                new_messages=self.new_messages, reply=reply if reply.get("content") or reply.get("tool_calls")
                else {"role": "assistant", "content": None, "tool_calls": []}, body=body, input_items=self.items))
        return body

    def _turn_events(self) -> AsyncGenerator[TurnEvent, None]:
        return self.e.sessions.turn(self.plan.session_id, self.plan.messages, self.params, tenant=self.tenant.name)

    async def _end(self) -> None:
        """After the turn: a turn that did not finish gives its predecessor back; a response that is
        not kept takes its session (or fork) with it. The close runs to its end even when this task is
        being cancelled: a client that leaves a stream has the server cancel the stream's task, and
        under anyio every await of its clean-up again, which would leave the session open (holding
        pages and one of the tenant's sessions) until its TTL."""
        if self.plan.claimed is not None and not self.committed:
            self.plan.claimed.continued = False
        if self.plan.close_after or (not self.committed and self.plan.claimed is None):
            closing = asyncio.ensure_future(self._close_session())
            self.e.closing.add(closing)  # the loop keeps only weak references to tasks
            closing.add_done_callback(self.e.closing.discard)
            await asyncio.shield(closing)

    async def _close_session(self) -> None:
        with contextlib.suppress(SessionError):
            await self.e.sessions.close(self.plan.session_id, tenant=self.tenant.name)

    async def full(self, raw_request: Any) -> dict[str, Any]:
        """The whole response. A client that leaves first cancels the turn (rolled back, its
        session given back by `_end`), as the other endpoints abort their requests: the engine
        does not generate the rest of a reply nobody will read."""
        reply = asyncio.ensure_future(self._full())
        gone = asyncio.ensure_future(wait_disconnect(raw_request))
        try:
            await asyncio.wait((reply, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not reply.done():
                reply.cancel()
                await asyncio.wait((reply,))  # its clean-up (`_end`) has run when this returns
        if reply.cancelled():
            raise ClientDisconnected()
        return reply.result()

    async def _full(self) -> dict[str, Any]:
        try:
            async with contextlib.aclosing(self._turn_events()) as events:
                async for ev in events:
                    if isinstance(ev, TurnResult):
                        return self._finish(ev)
        except Exception as e:  # noqa: BLE001
            raise self.e.http_error(e) from None
        finally:
            await self._end()
        raise OpenAIError(500, "the turn ended without a result")

    async def stream(self, created_status: str = "in_progress") -> AsyncIterator[str]:
        """Waits for the turn's first event before answering, so that what fails first (a schema that
        does not compile, a busy session) still gets its HTTP status."""
        events = self._turn_events()
        try:
            first = await events.__anext__()
        except BaseException as e:  # cancelled too: the session must still be given back
            try:
                await events.aclose()
            finally:
                await self._end()
            if isinstance(e, Exception):
                raise self.e.http_error(e) from None
            raise
        return self._sse(first, events, created_status)

    async def _sse(self, first: Any, events: AsyncGenerator[TurnEvent, None], created_status: str) -> AsyncIterator[str]:
        writer = self.writer = ResponseEvents(self._body("in_progress", [], None))
        try:
            for chunk in writer.start(created_status):
                yield chunk
            ev: Any = first
            while True:
                if isinstance(ev, TextEvent):
                    if ev.parts is not None:  # a reasoning parser split it: the reasoning is an item of its own
                        for chunk in writer.reasoning(ev.parts.reasoning) + writer.text(ev.parts.content):
                            yield chunk
                    else:
                        for chunk in writer.text(ev.text):
                            yield chunk
                elif isinstance(ev, ToolCallEvent):
                    for chunk in writer.call(ev.index, ev.id, ev.name, ev.arguments_delta):
                        yield chunk
                elif isinstance(ev, TurnResult):
                    status = "incomplete" if ev.finish_reason == "length" else "completed"
                    final = self._finish(ev, writer.output)
                    for chunk in writer.finish(dict(final, status=status)):
                        yield chunk
                    return
                try:
                    ev = await events.__anext__()
                except StopAsyncIteration:
                    return
        except Exception as e:  # noqa: BLE001 - the headers are out: the failure is an event
            err = self.e.http_error(e)
            message = err.message if isinstance(err, OpenAIError) else str(err)
            for chunk in writer.failed(message, err.code if isinstance(err, OpenAIError) else None):
                yield chunk
        finally:
            try:
                await events.aclose()
            finally:
                await self._end()
