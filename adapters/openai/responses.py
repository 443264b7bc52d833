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
from typing import Any, Optional

from agentserve.adapters.openai import responses_items as I
from agentserve.adapters.openai.conversations_store import Conversation, ConversationStore, listed_item
from agentserve.adapters.openai.protocol import OpenAIError, checked_cache_salt
from agentserve.adapters.openai.responses_background import BackgroundJob, BackgroundResponses
from agentserve.adapters.openai.responses_logprobs import requested_top_logprobs
from agentserve.adapters.openai.responses_run import ResponsePlan, ResponseRun
from agentserve.adapters.openai.responses_store import ResponsesStore, StoredResponse
from agentserve.adapters.openai.responses_truncation import fit_conversation, prompts_alike, reply_room
from agentserve.adapters.openai.serving import OpenAIServing, param_of, token_bias
from agentserve.adapters.openai.vllm_unsupported import check_structured_outputs_extras
from agentserve.chat import limits as L
from agentserve.chat.tool_schemas import check_tool_schemas
from agentserve.chat.tools import check_tool_choice, normalize_tools
from agentserve.engine.validation import logprobs_limit
from agentserve.errors import ContextLengthError, FieldError, InvalidRequestError, SessionError
from agentserve.sampling_params import SamplingParams
from agentserve.service.tenants import Tenant, held_slot_of_scope, tenant_of_scope
from agentserve.sessions.store import SessionStore

_SESSION_STATUS = {"NOT_FOUND": 404, "FAILED_PRECONDITION": 409, "RESOURCE_EXHAUSTED": 429, "CANCELLED": 499}


class ResponsesEndpoint:
    def __init__(self, serving: OpenAIServing, session_store: Optional[SessionStore]) -> None:
        self.s = serving
        self._sessions = session_store
        self._owned_sessions: Optional[SessionStore] = None
        self._store: Optional[ResponsesStore] = None
        self.conversations = ConversationStore(serving.config.server.max_sessions_per_tenant,
                                               serving.config.server.max_conversation_bytes_per_tenant)
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
    def check(self, req: I.ResponsesRequest) -> tuple[Optional[list[dict[str, Any]]], Any]:
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
        check_structured_outputs_extras(req.structured_outputs, self.s.engine.config.grammar_backend)
        if req.structured_outputs is not None and req.structured_outputs.json_schema is not None:
            L.check_schema(req.structured_outputs.json_schema, "structured_outputs.json", self.s.limits)
        if req.truncation not in (None, "auto", "disabled"):
            raise OpenAIError(400, f"truncation must be 'auto' or 'disabled', got {req.truncation!r}", param="truncation")
        # A session keeps its reply's text as the template re-renders it: only vLLM's defaults here.
        for name, off_default in (("skip_special_tokens", not req.skip_special_tokens),
                                  ("include_stop_str_in_output", req.include_stop_str_in_output)):
            if off_default:
                raise OpenAIError(400, f"{name}: only vLLM's default is supported on the Responses API here (use "
                                       "/v1/chat/completions for another value)", param=name)
        checked_cache_salt(req.cache_salt)
        if req.max_output_tokens is not None and req.max_output_tokens < 1:
            raise OpenAIError(400, f"max_output_tokens must be at least 1, got {req.max_output_tokens}",
                              param="max_output_tokens")
        drop_tools = choice == "none" and self.s.limits.exclude_tools_when_tool_choice_none  # vLLM's flag
        return (None if drop_tools else tools), choice

    def _params(self, req: I.ResponsesRequest, tools: Optional[list[dict[str, Any]]], choice: Any,
                top_logprobs: Optional[int]) -> SamplingParams:
        kw = self.s.with_model_defaults(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                                        repetition_penalty=req.repetition_penalty,
                                        presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty)
        kw.update(max_tokens=req.max_output_tokens, seed=req.seed, ignore_eos=req.ignore_eos, logprobs=top_logprobs,
                  stop=req.stop, logit_bias=token_bias(req.logit_bias), thinking_token_budget=req.thinking_token_budget)
        kw.update(I.constraint_kwargs(req))
        # Tools combine with a JSON answer (calls, or a typed final answer); a regex, choice or grammar wins.
        if tools and choice != "none" and not {"regex", "choice", "grammar"} & kw.keys():
            kw.update(tools=tools, tool_choice=choice, parallel_tool_calls=req.parallel_tool_calls is not False)
        elif tools:
            kw["tool_choice"] = "none"  # the session's tools are rendered, but no call is parsed
        try:
            return SamplingParams(**kw)
        except (ValueError, TypeError) as e:
            msg, param = str(e), param_of(str(e))
            if param == "max_tokens":  # the engine's name for this API's field, in the message as in param
                msg, param = "max_output_tokens" + msg[len("max_tokens"):], "max_output_tokens"
            elif param == "json_schema":  # likewise: the field that gave the schema
                param = "structured_outputs.json" if req.structured_outputs is not None else "text.format.schema"
            raise OpenAIError(400, msg, param=param) from None

    async def fitted(self, req: I.ResponsesRequest, history: list[dict[str, Any]], new_messages: list[dict[str, Any]],
                     tools: Optional[list[dict[str, Any]]], kwargs: dict[str, Any]) -> Optional[list[dict[str, Any]]]:
        """truncation "auto": the conversation with its oldest turns dropped, when it does not fit whole."""
        whole = self.system(req) + history + new_messages
        limit = self.s.engine.max_model_len
        return await fit_conversation(self.s.render_pool, whole, tools, limit - reply_room(req.max_output_tokens, limit),
                                      self.s.engine.arch.vocab_size, kwargs)

    async def _plan(self, req: I.ResponsesRequest, tenant: Tenant, prev: Optional[StoredResponse],
                    history: list[dict[str, Any]], new_messages: list[dict[str, Any]],
                    tools: Optional[list[dict[str, Any]]], render_key: str, adapter: Optional[str],
                    fitted: Optional[list[dict[str, Any]]], kwargs: dict[str, Any]) -> ResponsePlan:
        """`history`: prev's conversation ([] without prev)."""
        keep = req.store is not False
        if fitted is None and prev is not None and prev.render_key == render_key and not prev.continued:
            snap = await self.sessions.get(prev.session_id, tenant=tenant.name)
            # The renders only where the session could take the continuation; prev.continued checked again after
            # the awaits: only one continuation may take the session's tip.
            if snap.num_turns == prev.turn and not snap.busy and await self._continues_alike(
                    req, prev.session_id, history, new_messages, tools, kwargs) and not prev.continued:
                if keep:
                    prev.continued = True
                    return ResponsePlan(prev.session_id, new_messages, False, prev)
                child = await self.sessions.fork(prev.session_id, tenant=tenant.name)
                return ResponsePlan(child.session_id, new_messages, True, None)
        session_id = await self._new_session(req, tenant, tools, adapter, kwargs)
        return ResponsePlan(session_id, fitted if fitted is not None else self.system(req) + history + new_messages,
                            not keep, None, fitted=fitted is not None)

    async def _continues_alike(self, req: I.ResponsesRequest, session_id: str, history: list[dict[str, Any]],
                               new_messages: list[dict[str, Any]], tools: Optional[list[dict[str, Any]]],
                               kwargs: dict[str, Any]) -> bool:
        """Whether going on in the session that holds `history` prompts the model as the whole history sent again
        would (OpenAI: previous_response_id, or a conversation, means that history), token for token. The session
        holds the model's replies as generated, the history holds them parsed (tool calls, reasoning), which a
        template may render otherwise (its own JSON spacing, SmolLM2's none at all), and the model's own tokens
        may split the reply's text otherwise than the tokenizer does: then the continuation is rendered from the
        history on a new session (the prefix cache still serves what the two share)."""
        session = self.sessions.sessions.get(session_id)
        if session is None:
            return False
        # Read on the event loop while the session is idle (not busy).
        held, held_text, held_ids = list(session.messages), session.text, list(session.token_ids)
        pool, vocab, tools_n = self.s.render_pool, self.s.engine.arch.vocab_size, normalize_tools(tools)
        whole = self.system(req) + history + new_messages
        try:
            return await pool.run(lambda tok: prompts_alike(pool, tok, held, held_text, held_ids, whole, new_messages,
                                                             tools_n, vocab, kwargs))
        except InvalidRequestError:
            return False  # the history's rendering fails: the new session's turn says why

    async def _conversation_plan(self, req: I.ResponsesRequest, tenant: Tenant, conv: Conversation,
                                 whole: list[dict[str, Any]], tools: Optional[list[dict[str, Any]]], render_key: str,
                                 adapter: Optional[str], fitted: Optional[list[dict[str, Any]]],
                                 kwargs: dict[str, Any]) -> ResponsePlan:
        """A response on a conversation (`whole`: its items' messages, then this input's): on the session that
        holds the conversation so far when it can go on (prefilling only what came after), else on a new one."""
        if fitted is None and conv.session_id is not None and conv.render_key == render_key \
                and conv.session_id in self.sessions.sessions:
            held = I.input_messages(conv.items[:conv.session_items])
            with contextlib.suppress(SessionError):  # expired meanwhile: a new session
                snap = await self.sessions.get(conv.session_id, tenant=tenant.name)
                # Later items must not change how the held ones render (a function call appended to the
                # assistant message the session holds): then the held messages are not a prefix of the whole.
                if snap.num_turns == conv.session_turn and not snap.busy and whole[:len(held)] == held \
                        and len(whole) > len(held) and await self._continues_alike(
                            req, conv.session_id, held, whole[len(held):], tools, kwargs):
                    return ResponsePlan(conv.session_id, whole[len(held):], False, None, conversation=conv,
                                        resident=True)
        session_id = await self._new_session(req, tenant, tools, adapter, kwargs)
        return ResponsePlan(session_id, fitted if fitted is not None else self.system(req) + whole, False, None,
                            conversation=conv)

    @staticmethod
    def system(req: I.ResponsesRequest) -> list[dict[str, Any]]:
        return [{"role": "system", "content": req.instructions}] if req.instructions else []

    async def _new_session(self, req: I.ResponsesRequest, tenant: Tenant, tools: Optional[list[dict[str, Any]]],
                           adapter: Optional[str], kwargs: dict[str, Any]) -> str:
        snap = await self.sessions.create([], tools=tools, cache_salt=tenant.cache_salt(req.cache_salt), adapter=adapter,
                                          model=req.model or self.s.model_name, tenant=tenant.name,
                                          stored_response=True, chat_template_kwargs=kwargs)
        return snap.session_id

    async def release_session(self, session_id: str, tenant: str) -> None:
        """Closes a session that neither a stored response nor a conversation holds any more."""
        if self.store.uses_session(session_id) or self.conversations.holds_session(session_id):
            return
        with contextlib.suppress(SessionError):
            await self.sessions.close(session_id, tenant=tenant)

    def continued(self, req: I.ResponsesRequest, tenant: str, items: list[dict[str, Any]]
                  ) -> tuple[Optional[StoredResponse], Optional[Conversation], list[dict[str, Any]]]:
        """What the request continues (the stored response of previous_response_id, or the conversation of
        `conversation`: 404 when unknown, 400 for both) and its input items' messages, each item checked with
        its own path (`input[i]`)."""
        conv_id = I.conversation_id(req)
        prev = None
        if req.previous_response_id:
            self.background.check_not_running(req.previous_response_id, tenant, "previous_response_id")
            prev = self.store.get(req.previous_response_id, tenant, "previous_response_id")
        conv = self.conversations.get(conv_id, tenant, "conversation") if conv_id is not None else None
        return prev, conv, I.input_messages(items, prev.call_names() if prev is not None else None)

    async def create(self, req: I.ResponsesRequest, raw_request: Any) -> Any:
        tenant = tenant_of_scope(raw_request.scope)
        adapter = self.s.resolve_model(req.model)
        tools, choice = self.check(req)
        kwargs = I.template_kwargs(req)
        top_logprobs = requested_top_logprobs(req.model_extra or {}, logprobs_limit(
            self.s.config.model.max_logprobs, self.s.engine.arch.vocab_size))
        params = self._params(req, tools, choice, top_logprobs)
        items = self.store.resolve_references(I.normalize_input(req.input), tenant.name)
        prev, conv, new_messages = self.continued(req, tenant.name, items)
        if conv is not None:
            conv.check_idle()
            self.conversations.check_room(conv, items, "input")
            whole = I.input_messages(conv.items + items)  # checked above, item by item, with the right paths
            if not whole:
                raise OpenAIError(400, "input must contain at least one item (the conversation has none)",
                                  param="input")
            return await self._create_on_conversation(req, raw_request, tenant, conv, whole, items, adapter, tools,
                                                      choice, kwargs, params, top_logprobs)
        if not new_messages:
            raise OpenAIError(400, "input must contain at least one item", param="input")
        # The adapter's key (id + load generation), not only its name: after a reload of the name, the
        # earlier response's session holds KV of the old weights, so a continuation starts a new session.
        # The template variables and the cache salt too: a continuation that changes them renders on a new session.
        render_key = self._render_key(req, tools, adapter, kwargs)
        self.s.check_queue(1, 1)
        try:
            history = prev.conversation() if prev is not None else []
            fitted = await self.fitted(req, history, new_messages, tools, kwargs) if req.truncation == "auto" else None
            plan = await self._plan(req, tenant, prev, history, new_messages, tools, render_key, adapter, fitted, kwargs)
        except Exception as e:  # noqa: BLE001 - session errors -> HTTP statuses
            raise self.http_error(e) from None
        return await self._start(ResponseRun(self, req, tenant, plan, params, prev, new_messages, items, render_key,
                                             top_logprobs), raw_request)

    def _render_key(self, req: I.ResponsesRequest, tools: Optional[list[dict[str, Any]]], adapter: Optional[str],
                    kwargs: dict[str, Any]) -> str:
        return json.dumps([req.instructions, tools, adapter, self.s.engine.lora.resolve(adapter), kwargs,
                           req.cache_salt], sort_keys=True)

    async def _create_on_conversation(self, req: I.ResponsesRequest, raw_request: Any, tenant: Tenant,
                                      conv: Conversation, whole: list[dict[str, Any]], items: list[dict[str, Any]],
                                      adapter: Optional[str], tools: Optional[list[dict[str, Any]]], choice: Any,
                                      kwargs: dict[str, Any], params: SamplingParams,
                                      top_logprobs: Optional[int]) -> Any:
        render_key = self._render_key(req, tools, adapter, kwargs)
        self.s.check_queue(1, 1)
        conv.busy = True  # given back by the run's end, or below when no run starts
        try:
            fitted = await self.fitted(req, whole, [], tools, kwargs) if req.truncation == "auto" else None
            plan = await self._conversation_plan(req, tenant, conv, whole, tools, render_key, adapter, fitted, kwargs)
        except BaseException as e:
            conv.busy = False
            raise (self.http_error(e) if isinstance(e, Exception) else e) from None
        return await self._start(ResponseRun(self, req, tenant, plan, params, None, whole, items, render_key,
                                             top_logprobs), raw_request)

    async def _start(self, run: ResponseRun, raw_request: Any) -> Any:
        req = run.req
        if req.background:
            job = self.background.start(run, held_slot_of_scope(raw_request.scope))
            return job.follow(-1) if req.stream else job.body
        if req.stream:
            return await run.stream()
        return await run.full(raw_request)

    def http_error(self, e: BaseException) -> BaseException:
        if isinstance(e, ContextLengthError):  # worded for this API: its fields, its way out (truncation)
            asked = "" if e.max_tokens is None else f" and {e.max_tokens} for the output"
            return OpenAIError(400, f"This model's maximum context length is {e.limit} tokens. However, the "
                                    f"conversation with this input resulted in {e.tokens} tokens{asked}. Shorten the "
                                    "input" + (" or lower max_output_tokens" if asked else "") + ", or send "
                                    "truncation: \"auto\" to drop the conversation's oldest turns.",
                               param="input" if e.max_tokens is None else "max_output_tokens",
                               code="context_length_exceeded")
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
            await self.release_session(unused_session, tenant.name)
        return {"id": response_id, "object": "response", "deleted": True}

    def input_items(self, response_id: str, raw_request: Any, limit: int = 20, order: str = "desc",
                    after: Optional[str] = None) -> dict[str, Any]:
        job = self._job(response_id, raw_request)
        items = job.run.items if job is not None else \
            self.store.get(response_id, tenant_of_scope(raw_request.scope).name).input_items
        # In OpenAI's item shapes (a message's text as a list of parts, a status), as a conversation lists them.
        return I.input_items_page([listed_item(it) for it in items], limit, order, after)
