"""A session turn from arrival to its last event: reserve, render, begin, admit, drive, commit or roll back.

A turn is an engine request whose prompt is the session's tokens plus the new messages' tokens; it
starts from the session's pages (shared copy-on-write, `share_prefix=True`) so only the new tokens
are prefilled, and when it finishes the engine hands its pages back (`Engine.on_retained`, on the
step thread) and the session adopts them in place of the old ones.

Token history and the chat template (append-consistency). A session keeps the model's own tokens:
after a turn its history is the turn's prompt tokens plus the tokens the model generated. The next
turn renders the whole conversation (all messages, with the reply as an assistant message) with the
chat template; when the text the session's tokens decode to is a prefix of that rendering — the usual
case with append-consistent templates — only the rest (the end-of-turn marker, the new messages and
the generation prompt) is tokenized and appended. So decoding a session's tokens always gives exactly
the rendered conversation, and a turn's prompt is exactly what a stateless request over the same
tokens gets (the exactness tests compare with that). Where the template re-renders history
differently from what was generated (a stop string cut the reply, a tool call re-serialised, a
different end-of-turn token), the conversation is re-tokenized from scratch and the pages of the
longest common token prefix are kept (`stats.rerenders` counts these).

Cancelling a turn: a turn that the engine had not finished when the cancel arrived is rolled back — the session's
tokens, messages and pages are exactly as before the turn (the turn ran on its own copy-on-write references, which
the abort frees). A turn the engine had already finished is kept whole. Either way no page leaks and the session is
not left busy, wherever the cancel lands: while the turn's set-up is queued or running on the step thread (an undo
queued behind it ends the turn), queued for admission, mid-prefill or mid-decode.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import math
import time
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, TypeVar

from agentserve.chat.render_pool import RenderPool
from agentserve.engine.async_engine import AsyncEngine
from agentserve.engine.engine import Engine
from agentserve.errors import ContextLengthError, EngineDeadError, InvalidRequestError
from agentserve.outputs import CompletionOutput, RequestOutput
from agentserve.sampling_params import SamplingParams
from agentserve.chat import render as R
from agentserve.sessions.residency import Residency, TurnAdmission
from agentserve.sessions.shown_reply import shown_reply
from agentserve.chat.reasoning import ReplyReasoning
from agentserve.chat.reply import ReplyStream, content_beside_calls
from agentserve.sessions.types import (ANONYMOUS_TENANT, PendingTurn, ReplyParts, Session, SessionBusyError, SessionStats,
                                       TextEvent, ToolCallEvent, TurnCancelledError, TurnEvent, TurnResult, Usage,
                                       snapshot_of, timing_from_metrics)

T = TypeVar("T")
_SENTINEL_DONE = object()


class TurnLifecycle:
    """The turn half of SessionStore (sessions/store.py), which sets the attributes below."""

    aeng: AsyncEngine
    engine: Engine
    render_pool: RenderPool
    tokenizer: Any
    residency: Residency
    stats: SessionStats
    _pending: dict[str, PendingTurn]  # request id -> turn in flight
    _ids: "itertools.count[int]"

    if TYPE_CHECKING:
        def _get(self, session_id: str) -> Session: ...

        def _owned(self, session_id: str, tenant: str) -> Session: ...

    # --- the step thread ----------------------------------------------------------------------------
    async def _run(self, fn: Callable[[], T]) -> T:
        return await self.aeng.run(fn)

    def _call_soon(self, fn: Callable[[], Any]) -> "concurrent.futures.Future[Any]":
        """fn on the step thread; inline when the step thread is gone (after shutdown)."""
        try:
            return self.aeng.call_soon(fn)
        except EngineDeadError:
            if self.aeng._thread.is_alive():
                raise
            fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
            try:
                fut.set_result(fn())
            except BaseException as e:  # noqa: BLE001
                fut.set_exception(e)
            return fut

    # --- set-up (step thread, around the off-thread rendering) ---------------------------------------
    def _reserve_turn(self, session_id: str, params: SamplingParams, expected_next_turn_ms: float,
                      received_at: float) -> tuple[PendingTurn, R.TurnBasis]:
        """Step thread, constant time: marks the session busy as its turn arrives, as a turn rendered
        here used to (eviction then counts it as a session with a turn on its way), and reads the
        history the turn renders on — which cannot change while the session is busy. The turn's
        prompt is rendered off this thread; `_begin_turn` adopts it, `_abandon_turn` undoes this."""
        s = self._get(session_id)
        self.settle_ended_turn(s)
        if s.busy is not None:
            raise SessionBusyError(f"session {session_id!r} already has a turn in flight")
        if params.prompt_logprobs is not None:
            raise InvalidRequestError("prompt_logprobs is not available on session turns: the resident history "
                                      "is not recomputed, so it has no logits; use a stateless request")
        if not math.isfinite(expected_next_turn_ms) or expected_next_turn_ms < 0:
            raise InvalidRequestError(f"expected_next_turn_ms must be a finite number >= 0 (0: no hint), "
                                      f"got {expected_next_turn_ms}")
        pending = PendingTurn(session=s, request_id=f"{s.session_id}/t{s.num_turns}-{next(self._ids)}",
                              prompt_token_ids=[], prompt_text="", new_messages=[], content_prefix="", params=params,
                              expected_next_turn_ms=expected_next_turn_ms, received_at=received_at)
        s.busy = pending  # only reclaim's last resort evicts it now (until admitted); not idle: the TTL restarts
        s.mark_active(time.monotonic())
        return pending, R.TurnBasis(s.messages, s.text, s.token_ids, s.tools, s.raw_tokens, s.template_kwargs)

    def _abandon_turn(self, pending: PendingTurn) -> None:
        """Step thread: a turn that failed or was cancelled before `_begin_turn` put it in the engine
        gives its session back (releasing it if it was closed meanwhile)."""
        self._pending.pop(pending.request_id, None)  # _begin_turn may have run (a cancel while it was queued)
        s = pending.session
        if s.busy is pending:
            s.busy = None
        s.mark_active(time.monotonic())  # busy was not idle: a turn rolled back restarts the TTL too
        if s.closed and s.busy is None:
            self.residency.release(s)

    def _abandon_turns(self, reserved: Sequence[PendingTurn]) -> None:
        for pending in reserved:  # step thread: each turn a cancelled `turn` had reserved (none or one)
            self._abandon_turn(pending)

    async def _render_turn(self, basis: R.TurnBasis, messages: Sequence[dict[str, Any]]) -> R.RenderedTurn:
        """The turn's prompt, rendered and tokenized in the render pool (not on the step thread)."""
        pool = self.render_pool
        if not basis.raw_tokens:
            pool.check_messages(messages)  # what cannot fit is refused before it waits for a worker
        return await pool.run(lambda tok: R.prepare_turn(pool, tok, basis, messages, self.engine.arch.vocab_size))

    def _begin_turn(self, pending: PendingTurn, rendered: R.RenderedTurn) -> PendingTurn:
        """Step thread. Adopts the turn's prompt (as `_render_turn` built it) and validates it; the
        session's pages go to the turn's request at admission (Residency.admit). Nothing about the
        session changes when this raises (the caller then abandons the turn)."""
        s = pending.session
        if s.closed:
            raise TurnCancelledError("the session was closed during the turn")
        new, prompt, prompt_text = rendered.new_messages, rendered.prompt, rendered.prompt_text
        keep = s.num_computed
        rerendered = rendered.common_prefix is not None
        if rendered.common_prefix is not None:
            keep = min(keep, rendered.common_prefix)
        keep = min(keep, len(prompt) - 1)
        params = pending.params
        limit = self.engine.max_model_len
        if len(prompt) >= limit:  # the engine's message would blame a prompt the client never sent whole
            raise ContextLengthError(
                f"the session's history ({len(s.token_ids)} tokens) and this turn's messages make {len(prompt)} "
                f"tokens; max_model_len is {limit} (prompt plus output must fit): send shorter messages or "
                "continue in a new session", "messages", len(prompt), limit)
        params = self.engine.validate(prompt, params)  # resolves an unset max_tokens as every entry point does
        if params.n != 1:
            raise InvalidRequestError("n must be 1 for a session turn; fork the session for parallel replies")
        self.stats.rerenders += rerendered
        pending.prompt_token_ids, pending.prompt_text, pending.new_messages = prompt, prompt_text, new
        pending.content_prefix, pending.params = rendered.content_prefix, params
        self.residency.keep_prefix(s, keep)
        self._pending[pending.request_id] = pending
        return pending

    # --- the end (step thread) -----------------------------------------------------------------------
    def _on_retained(self, out: RequestOutput) -> None:
        """Engine hook (step thread): a turn finished; the session adopts the turn's pages."""
        pending = self._pending.pop(out.request_id, None)
        if pending is None or out.retained_block_table is None:
            return
        table, num_computed = out.retained_block_table, out.retained_num_computed_tokens
        out.retained_block_table = None
        s = pending.session
        if s.closed or out.error or out.outputs[0].finish_reason == "error":
            self.residency.pool.free(table)  # closed meanwhile, or the turn failed (e.g. its grammar): rolled back
            return
        comp = out.outputs[0]
        output_ids = list(comp.token_ids)
        if comp.ends_on_stop_token(self.engine.eos_token_ids):
            # The stop token (EOS) was sampled, never fed (it has no KV), and the chat template ends the
            # reply with its own end-of-turn marker, which may be another token (a tiny model's
            # <|endoftext|> against ChatML's <|im_end|>): the history, like its assistant message, stops
            # before it, so the next turn's render extends it and reuses every page.
            output_ids = output_ids[:-1]
            num_computed = min(num_computed, len(pending.prompt_token_ids) + len(output_ids))
        self.residency.adopt(s, table, num_computed, out.retained_num_draft_computed_tokens)
        s.token_ids = pending.prompt_token_ids + output_ids
        history_msg, client_msg = self._assistant_messages(s, comp, pending)
        if not s.raw_tokens:
            s.text = pending.prompt_text + R.decode_continuation(self.tokenizer, pending.prompt_token_ids, output_ids)
        s.messages = s.messages + pending.new_messages + [history_msg]
        pending.history_index = len(s.messages) - 1
        shown = None if s.raw_tokens else shown_reply(self.tokenizer, pending, comp, history_msg, s.tools,
                                                      self.engine.eos_token_ids, self.engine.reasoning)
        if shown is not None:  # shown as TurnDone's message is, from the commit on (sessions/shown_reply.py)
            s.shown_replies[pending.history_index] = shown
        s.num_turns += 1
        now = time.monotonic()
        s.mark_active(now)
        s.expected_by = now + pending.expected_next_turn_ms / 1e3 if pending.expected_next_turn_ms > 0 else None
        pending.committed = True
        pending.result_message = client_msg
        s.busy = None
        pending.snapshot = snapshot_of(s)
        self.stats.turns += 1

    def _assistant_messages(self, s: Session, comp: CompletionOutput,
                            pending: PendingTurn) -> tuple[dict[str, Any], dict[str, Any]]:
        """(the reply as the session's history keeps it, the reply as the client sees it)."""
        ids = list(comp.token_ids)
        if s.raw_tokens:
            return {"role": "assistant", "token_ids": ids}, {"role": "assistant", "content": comp.text or ""}
        # History: the model's own text with special tokens spelled out (so the template re-renders
        # it as generated), minus a final stop token, which the template writes as its end marker.
        if comp.ends_on_stop_token(self.engine.eos_token_ids):
            ids = ids[:-1]
        raw_text = R.decode_continuation(self.tokenizer, pending.prompt_token_ids, ids)
        prefix = pending.content_prefix
        if prefix and raw_text.startswith(prefix):
            raw_text = raw_text[len(prefix):]  # the template writes it back (Llama 2's ' ' after [/INST])
        history = {"role": "assistant", "content": raw_text or ""}
        client = {"role": "assistant", "content": comp.text or ""}
        return history, client

    def settle_ended_turn(self, s: Session) -> None:
        """Step thread: runs a turn's queued `_end_turn` now when its task has already ended (cancelled,
        failed), so a Turn or Fork sent right after a cancel does not race that roll-back into
        FAILED_PRECONDITION. (Task.done() reads one attribute, and stays true: safe from this thread.)"""
        pending = s.busy
        if pending is not None and pending.task is not None and pending.task.done():
            self._end_turn(pending)

    def _end_turn(self, pending: PendingTurn) -> None:
        """Step thread, always last for a turn: takes the request out of the engine if it is still
        there (cancel, error) — which rolls the turn back — and releases a session closed meanwhile.
        Runs once; the queued call finds it done when `settle_ended_turn` ran it first."""
        if pending.end_ran:
            return
        pending.end_ran = True
        self.engine.abort(pending.request_id)
        self._pending.pop(pending.request_id, None)
        s = pending.session
        if s.busy is pending:
            s.busy = None
            s.mark_active(time.monotonic())  # busy was not idle: a rolled-back turn restarts the TTL too
            self.stats.rolled_back += 1
        if s.closed and s.busy is None:
            self.residency.release(s)

    # --- the turn (event loop) -----------------------------------------------------------------------
    async def turn(self, session_id: str, messages: Sequence[dict[str, Any]], params: Optional[SamplingParams] = None,
                   *, expected_next_turn_ms: float = 0.0, priority: int = 0, received_at: Optional[float] = None,
                   tenant: str = ANONYMOUS_TENANT) -> AsyncGenerator[TurnEvent, None]:
        """Runs one turn: yields TextEvents (and ToolCallEvents), then one TurnResult. Leaving the
        iteration early cancels the turn (rolled back unless the engine had already finished it).
        Use it under contextlib.aclosing (or exhaust it) so that cancellation is prompt."""
        received_at = time.monotonic() if received_at is None else received_at
        params = params or SamplingParams()
        loop = asyncio.get_running_loop()
        reserved: list[PendingTurn] = []

        def reserve() -> tuple[PendingTurn, R.TurnBasis]:
            self._owned(session_id, tenant)
            pending, basis = self._reserve_turn(session_id, params, expected_next_turn_ms, received_at)
            pending.loop = loop
            reserved.append(pending)
            return pending, basis

        try:
            pending, basis = await self._run(reserve)
        except asyncio.CancelledError:
            # Cancelled while `reserve` was queued or running: a running step-thread call cannot be
            # stopped, so it may have marked the session busy. Commands run in order, so this undo
            # runs after it (and finds nothing when `reserve` never ran).
            self._call_soon(lambda: self._abandon_turns(reserved))
            raise
        try:
            rendered = await self._render_turn(basis, messages)
            await self._run(lambda: self._begin_turn(pending, rendered))
        except BaseException:
            self._call_soon(lambda: self._abandon_turn(pending))
            raise
        queue: asyncio.Queue[Any] = asyncio.Queue()
        ended = pending.ended = asyncio.Event()
        task = loop.create_task(self._drive(pending, queue, priority))
        pending.task = task
        if pending.session.closed:  # closed between begin and now (_close could not cancel a task yet)
            task.cancel()

        def on_done(t: "asyncio.Task[None]") -> None:
            if t.cancelled():
                queue.put_nowait(TurnCancelledError(
                    "the session was closed during the turn" if pending.session.closed else "the turn was cancelled"))
            elif t.exception() is not None:
                queue.put_nowait(t.exception())
            try:
                fut = self._call_soon(lambda: self._end_turn(pending))
            except EngineDeadError:  # shutting down: the engine's requests and pages go with it
                ended.set()
                return
            fut.add_done_callback(lambda _f: loop.call_soon_threadsafe(ended.set))

        task.add_done_callback(on_done)
        try:
            while True:
                item = await queue.get()
                if item is _SENTINEL_DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if not task.done():
                task.cancel()
            try:
                await asyncio.shield(ended.wait())
            except asyncio.CancelledError:
                pass

    async def _drive(self, pending: PendingTurn, queue: "asyncio.Queue[Any]", priority: int) -> None:
        s = pending.session
        reply = ReplyStream(self.engine.tokenizer, pending.prompt_token_ids, pending.params, s.tools,
                            self.engine.eos_token_ids, self.engine.reasoning)
        gen = self.aeng.generate(pending.request_id, pending.prompt_token_ids, pending.params,
                                 retain_blocks=True, share_prefix=True, priority=priority, cache_salt=s.cache_salt,
                                 lora_name=s.adapter, lora_key=s.lora_key,
                                 admit_hook=TurnAdmission(self.residency, pending))
        markers = self.engine.reasoning
        thoughts = ReplyReasoning(markers, pending.prompt_token_ids) if markers is not None else None
        try:
            async for out in gen:
                comp = out.outputs[0]
                for event in TextEvent.of_pieces(comp, reply.feed(out), thoughts):
                    queue.put_nowait(event if isinstance(event, TextEvent) else
                                     ToolCallEvent(event.index, event.id, event.name, event.arguments_delta))
                if out.finished and (out.error or comp.finish_reason == "error"):
                    raise out.failure("the turn failed")
                if out.finished:
                    if thoughts is not None:
                        held = ReplyParts(*thoughts.finish())  # text held while undecided (only a marker's start)
                        if held.reasoning or held.content:
                            queue.put_nowait(TextEvent("", [], held))
                    result = self._final_result(pending, out, reply)
                    if thoughts is not None and markers is not None:
                        reasoning, answer = thoughts.split(result.message.get("content") or "")
                        result.parts = ReplyParts(reasoning, content_beside_calls(answer, "tool_calls" in result.message))
                        result.usage.reasoning_tokens = markers.reasoning_tokens(pending.prompt_token_ids, result.token_ids)
                    self._show_final_reply(pending, result)
                    queue.put_nowait(result)
                    queue.put_nowait(_SENTINEL_DONE)
                    return
        finally:
            await gen.aclose()
        raise RuntimeError("the engine ended the turn without a final output")

    def _show_final_reply(self, pending: PendingTurn, result: TurnResult) -> None:
        """GetSession shows the reply as TurnDone's message (tool calls parsed out, the thinking apart); queued
        on the step thread before the client gets TurnDone, so its later GetSession sees it."""
        if pending.session.raw_tokens or ("tool_calls" not in result.message and result.parts is None):
            return  # the history's message is what GetSession shows
        shown = dict(result.message)
        if result.parts is not None:
            shown.update(content=result.parts.content, reasoning_content=result.parts.reasoning)

        def record() -> None:  # step thread, like every change to a session
            if pending.committed and pending.history_index is not None and not pending.session.closed:
                pending.session.shown_replies[pending.history_index] = shown
        with contextlib.suppress(EngineDeadError):  # shutting down: no GetSession follows
            self._call_soon(record)

    def _final_result(self, pending: PendingTurn, out: RequestOutput, reply: ReplyStream) -> TurnResult:
        result = self._result(pending, out)
        content, tool_calls = reply.final()
        if content is not None:
            result.message = dict(result.message, content=content)
        if tool_calls:
            result.message["tool_calls"] = tool_calls
            if result.finish_reason == "stop":
                result.finish_reason = "tool_calls"
        return result

    def _result(self, pending: PendingTurn, out: RequestOutput) -> TurnResult:
        comp = out.outputs[0]
        if pending.session.closed and not pending.committed:
            raise TurnCancelledError("the session was closed during the turn")
        if not pending.committed or pending.snapshot is None or pending.result_message is None:
            raise RuntimeError(f"turn {pending.request_id} finished without handing its pages back")
        m = out.metrics
        timing = timing_from_metrics(m, pending.received_at)
        timing.swap_in_ms, timing.swap_wait_ms = pending.swap_in_ms, pending.swap_wait_ms
        usage = Usage(prompt_tokens=len(pending.prompt_token_ids),
                      cached_tokens=m.num_cached_tokens if m else 0,
                      prefilled_tokens=m.num_prefilled_tokens if m else 0,
                      completion_tokens=len(comp.token_ids), swapped_in_tokens=pending.swapped_in_tokens)
        return TurnResult(message=pending.result_message, finish_reason=comp.finish_reason or "stop", usage=usage,
                          timing=timing, token_ids=list(comp.token_ids),
                          prompt_token_ids=list(pending.prompt_token_ids), session=pending.snapshot)
