"""One response of the Responses API (responses.py): its plan (the session its turn runs on, the
messages the turn adds) and its run: the turn, answered whole or as the official events, then stored.
Output logprobs, when asked, follow the turn's text deltas (responses_logprobs.py)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from typing import TYPE_CHECKING, Any, AsyncGenerator, AsyncIterator, Coroutine, Optional

from agentserve.adapters.openai import responses_items as I
from agentserve.adapters.openai.conversations_store import Conversation, listed_item
from agentserve.adapters.openai.protocol import OpenAIError
from agentserve.adapters.openai.responses_events import (ResponseEvents, response_body, response_error_code,
                                                         responses_usage)
from agentserve.adapters.openai.responses_logprobs import MessageLogprobs
from agentserve.adapters.openai.responses_store import StoredResponse
from agentserve.adapters.openai.responses_truncation import leading_system_count
from agentserve.adapters.openai.serving import ClientDisconnected, now, wait_disconnect
from agentserve.errors import SessionError
from agentserve.sampling_params import SamplingParams
from agentserve.service.tenants import Tenant
from agentserve.sessions.types import TextEvent, ToolCallEvent, TurnEvent, TurnResult

if TYPE_CHECKING:
    from agentserve.adapters.openai.responses import ResponsesEndpoint


class ResponsePlan:
    """One response's plan: the session it runs on, the messages its turn adds, what it continues (a stored
    response whose session tip it took, or a conversation, which it has to itself until the run ends).
    `resident`: the session was the conversation's already, and outlives a turn that fails. `fitted`: the
    messages are the whole conversation cut to the context (truncation "auto"), instructions first."""

    def __init__(self, session_id: str, messages: list[dict[str, Any]], close_after: bool,
                 claimed: Optional[StoredResponse], conversation: Optional[Conversation] = None,
                 resident: bool = False, fitted: bool = False) -> None:
        self.session_id, self.messages, self.close_after, self.claimed = session_id, messages, close_after, claimed
        self.conversation, self.resident, self.fitted = conversation, resident, fitted


class ResponseRun:
    """One response: runs its turn, answers it whole or as events, stores it."""

    def __init__(self, endpoint: "ResponsesEndpoint", req: I.ResponsesRequest, tenant: Tenant, plan: ResponsePlan,
                 params: SamplingParams, prev: Optional[StoredResponse], new_messages: list[dict[str, Any]],
                 items: list[dict[str, Any]], render_key: str, top_logprobs: Optional[int]) -> None:
        self.e, self.req, self.tenant, self.plan, self.params = endpoint, req, tenant, plan, params
        self.prev, self.new_messages, self.items, self.render_key = prev, new_messages, items, render_key
        self.id = I.new_id("resp")
        self.created = now()
        self.model = req.model or endpoint.s.model_name
        self.committed = False
        self.releases: list[asyncio.Future[None]] = []  # sessions being let go by this response
        self.writer: Optional[ResponseEvents] = None  # the stream's events, once streaming
        self.top_logprobs = top_logprobs  # None: no output logprobs asked for
        self.logprobs = MessageLogprobs(endpoint.s.logprob_formatter(None), top_logprobs) \
            if top_logprobs is not None else None

    def body(self, status: str) -> dict[str, Any]:
        return self._body(status, [], None)

    def _body(self, status: str, output: list[dict[str, Any]], result: Optional[TurnResult]) -> dict[str, Any]:
        usage = None
        if result is not None:
            u = result.usage
            usage = responses_usage(u.prompt_tokens, u.cached_tokens, u.completion_tokens, u.reasoning_tokens)
        reason = "max_output_tokens" if result is not None and result.finish_reason == "length" else None
        return response_body(self.id, self.req, self.model, self.created, status=status, output=output,
                             usage=usage, incomplete_reason=reason, top_logprobs=self.top_logprobs)

    def _finish(self, result: TurnResult, output: Optional[list[dict[str, Any]]] = None) -> dict[str, Any]:
        status = "incomplete" if result.finish_reason == "length" else "completed"
        if output is None:
            if self.logprobs is not None:
                self.logprobs.finish()  # the tokens still held join `message`
            parts = result.parts
            if parts is not None and not self.req.include_reasoning:
                parts = dataclasses.replace(parts, reasoning="")
            output = I.output_items(result.message, status, parts,
                                    self.logprobs.message if self.logprobs is not None else None)
        body = self._body(status, output, result)
        reply = {k: v for k, v in result.message.items() if k in ("role", "content", "tool_calls")}
        self.committed = True
        conv = self.plan.conversation
        if conv is not None:
            self._record(conv, output, result.session.num_turns)
        if self.req.store is not False:
            # A response on a conversation is continued (previous_response_id) on a new session: the
            # conversation keeps its session's tip. A truncated one is the conversation it ran on (what was
            # dropped stays dropped for its continuations), without the instructions (not carried over).
            parent, new_messages = self.prev, self.new_messages
            if self.plan.fitted:
                parent, new_messages = None, self.plan.messages[leading_system_count(self.plan.messages):]
            self.e.store.add(StoredResponse(
                response_id=self.id, tenant=self.tenant.name, session_id=self.plan.session_id,
                turn=result.session.num_turns, render_key=self.render_key, parent=parent,
                new_messages=new_messages, reply=reply if reply.get("content") or reply.get("tool_calls")
                else {"role": "assistant", "content": None, "tool_calls": []}, body=body, input_items=self.items,
                continued=conv is not None))
        return body

    def _record(self, conv: Conversation, output: list[dict[str, Any]], turns: int) -> None:
        """The conversation gains this response's input and output items, and its session is now this one."""
        self.e.conversations.append(conv, [listed_item(item) for item in [*self.items, *output]])
        old = conv.session_id
        conv.session_id, conv.session_items, conv.session_turn = self.plan.session_id, len(conv.items), turns
        conv.render_key = self.render_key
        if old is not None and old != conv.session_id:  # closed unless a stored response holds it
            self._release(self.e.release_session(old, self.tenant.name))

    def _release(self, closing: Coroutine[Any, Any, None]) -> None:
        """Lets a session go in a task of its own, which `_end` waits for (shielded: it runs to its end)."""
        task = asyncio.ensure_future(closing)
        self.e.closing.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self.e.closing.discard)
        self.releases.append(task)

    def _turn_events(self) -> AsyncGenerator[TurnEvent, None]:
        return self.e.sessions.turn(self.plan.session_id, self.plan.messages, self.params, tenant=self.tenant.name,
                                    priority=self.req.priority)

    async def _end(self) -> None:
        """After the turn: a turn that did not finish gives its predecessor back; a response that is
        not kept takes its session (or fork) with it. The close runs to its end even when this task is
        being cancelled: a client that leaves a stream has the server cancel the stream's task, and
        under anyio every await of its clean-up again, which would leave the session open (holding
        pages and one of the tenant's sessions) until its TTL."""
        if self.plan.claimed is not None and not self.committed:
            self.plan.claimed.continued = False
        if self.plan.conversation is not None:
            self.plan.conversation.busy = False
        if self.plan.close_after or (not self.committed and self.plan.claimed is None and not self.plan.resident):
            self._release(self._close_session())
        for release in self.releases:
            await asyncio.shield(release)

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
                    self._follow_logprobs(ev)
        except Exception as e:  # noqa: BLE001
            raise self.e.http_error(e) from None
        finally:
            await self._end()
        raise OpenAIError(500, "the turn ended without a result")

    def _follow_logprobs(self, ev: TurnEvent) -> Optional[list[dict[str, Any]]]:
        """The logprobs of a text event's message text (None when not asked); a tool call's tokens carry none."""
        if self.logprobs is None:
            return None
        if isinstance(ev, ToolCallEvent):
            self.logprobs.tool_call()
        return self.logprobs.text(ev) if isinstance(ev, TextEvent) else None

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
                logprobs = self._follow_logprobs(ev)
                if isinstance(ev, TextEvent):
                    if ev.parts is not None:  # a reasoning parser split it: the reasoning is an item of its own
                        thought = ev.parts.reasoning if self.req.include_reasoning else ""
                        for chunk in writer.reasoning(thought) + writer.text(ev.parts.content, logprobs):
                            yield chunk
                    else:
                        for chunk in writer.text(ev.text, logprobs):
                            yield chunk
                elif isinstance(ev, ToolCallEvent):
                    for chunk in writer.call(ev.index, ev.id, ev.name, ev.arguments_delta):
                        yield chunk
                elif isinstance(ev, TurnResult):
                    status = "incomplete" if ev.finish_reason == "length" else "completed"
                    trailing = self.logprobs.finish() if self.logprobs is not None else None
                    for chunk in writer.finish(dict(self._finish(ev, writer.output), status=status), trailing):
                        yield chunk
                    return
                try:
                    ev = await events.__anext__()
                except StopAsyncIteration:
                    return
        except Exception as e:  # noqa: BLE001 - the headers are out: the failure is an event
            err = self.e.http_error(e)
            message = err.message if isinstance(err, OpenAIError) else str(err)
            code = response_error_code(err.status, err.code) if isinstance(err, OpenAIError) else "server_error"
            for chunk in writer.failed(message, code):
                yield chunk
        finally:
            try:
                await events.aclose()
            finally:
                await self._end()
