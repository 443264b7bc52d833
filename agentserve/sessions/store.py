"""Sessions: conversations whose KV pages stay resident between agent turns.

A session holds its token history and a block table (references on KV pages). This file is the
store: create, get, list, fork and close, TTL expiry, ownership and session limits. A turn's life
(render, admit, generate, commit or roll back) is in sessions/turns.py; where a session's pages live
between turns (resident, swapped, evicted) in sessions/residency.py; the data types in
sessions/types.py.

Threading: the engine is not thread-safe, so every operation that touches pages or session state runs
on the engine's step thread (through `AsyncEngine.run`, or inside the engine's hooks: the scheduler's
`reclaim` and `on_retained`). The async methods are thin wrappers around those step-thread functions.
Closing a session with a turn in flight aborts the turn's request and frees every page at once.

Ownership: a session belongs to the tenant that created it (its forks too); every public call takes
the caller's tenant, and another tenant's session is NOT_FOUND, exactly like an unknown one. Session
counts are bounded globally and per tenant (SessionLimitError, RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import heapq
import itertools
import logging
import math
import time
import uuid
from typing import Any, Optional, Sequence

from agentserve.chat.render_pool import RenderPool
from agentserve.engine.async_engine import AsyncEngine
from agentserve.errors import EngineDeadError, InvalidRequestError
from agentserve.lora.key import LoRAKey
from agentserve.chat import render as R
from agentserve.sessions.residency import Residency
from agentserve.sessions.turns import TurnLifecycle
from agentserve.sessions.types import (ANONYMOUS_TENANT, DEFAULT_MAX_SESSIONS, DEFAULT_TTL_SECONDS, PendingTurn,
                                       Session, SessionBusyError, SessionLimitError, SessionListCursor,
                                       SessionNotFoundError, SessionSnapshot, SessionState, SessionStats,
                                       snapshot_of)

logger = logging.getLogger(__name__)


class SessionStore(TurnLifecycle):
    def __init__(self, async_engine: AsyncEngine, *, default_ttl: float = DEFAULT_TTL_SECONDS,
                 expiry_interval: float = 1.0, render_pool: Optional[RenderPool] = None,
                 max_sessions: int = DEFAULT_MAX_SESSIONS, max_sessions_per_tenant: Optional[int] = None) -> None:
        self.aeng = async_engine
        self.engine = engine = async_engine.engine
        if engine.on_retained is not None:
            raise RuntimeError("this engine already has a session store")
        # Rendering and tokenizing grow with the input: they run here, never on the step thread.
        self.render_pool = render_pool or RenderPool(engine.tokenizer, engine.max_model_len, engine.config.server)
        self.tokenizer = engine.tokenizer
        self.has_template = R.has_chat_template(self.tokenizer)
        self.default_ttl = default_ttl
        self.expiry_interval = expiry_interval
        self.sessions: dict[str, Session] = {}
        self.max_sessions = max_sessions
        self.max_sessions_per_tenant = max_sessions_per_tenant or max_sessions
        self._sessions_of: collections.Counter[str] = collections.Counter()  # tenant -> open sessions
        self._pending: dict[str, PendingTurn] = {}  # request id -> turn in flight
        self.stats = SessionStats()
        self.residency = Residency(engine.pool, engine.kv, engine.scheduler, engine.runner.kv_cache.num_swap_blocks,
                                   self.sessions, self._pending, self.stats, copy_ready=engine.runner.swap_in_ready,
                                   pages_hold_draft=engine.runner.draft is not None)
        self._ids = itertools.count()
        self._expiry_task: Optional[asyncio.Task[None]] = None
        engine.session_store = self  # the engine's owner finds the store through it (tests: pages left)
        engine.scheduler.reclaim = self.residency.reclaim
        engine.on_retained = self._on_retained
        engine.lora.session_users = self._sessions_using  # unloading an adapter checks its sessions

    def detach(self) -> None:
        """Unhooks the store from the engine (after close_all), so the engine can serve another store."""
        if self.engine.on_retained == self._on_retained:
            self.engine.scheduler.reclaim = None
            self.engine.on_retained = None
            self.engine.session_store = None
            self.engine.lora.session_users = None

    # --- plumbing -----------------------------------------------------------------------------------
    def _sessions_using(self, key: LoRAKey) -> list[str]:
        """Open sessions bound to an adapter key (step thread, like every change to self.sessions). The
        Responses API's stored sessions are not counted: nobody holds them open, and a turn running on one
        is counted among the requests."""
        return [s.session_id for s in list(self.sessions.values())
                if s.lora_key == key and s.state is not SessionState.CLOSED and not s.stored_response]

    def __len__(self) -> int:
        return len(self.sessions)

    @property
    def num_swap_slots(self) -> int:
        return self.residency.num_swap_slots

    @property
    def num_free_swap_slots(self) -> int:
        return self.residency.num_free_swap_slots

    def residency_counts(self) -> dict[str, int]:
        """{"new", "resident", "swapped", "evicted": count}; safe to call from any thread."""
        counts = {s.value: 0 for s in SessionState if s is not SessionState.CLOSED}
        for _ in range(5):
            try:
                sessions = list(self.sessions.values())
                break
            except RuntimeError:  # changed size on the step thread while copying: try again
                continue
        else:
            return counts
        for s in sessions:
            if s.state is not SessionState.CLOSED:
                counts[s.state.value] += 1
        return counts

    def session_tools(self, session_id: str, tenant: str = ANONYMOUS_TENANT) -> Optional[list[dict[str, Any]]]:
        """The tools a session was created with (immutable, so readable from any thread)."""
        return self._owned(session_id, tenant).tools

    def _get(self, session_id: str) -> Session:
        s = self.sessions.get(session_id)
        if s is None:
            raise SessionNotFoundError(f"session {session_id!r} not found (unknown, closed or expired)")
        return s

    def _owned(self, session_id: str, tenant: str) -> Session:
        """The session, if `tenant` owns it; another tenant's session is NOT_FOUND, like an unknown one."""
        s = self.sessions.get(session_id)
        if s is None or s.tenant != tenant:
            raise SessionNotFoundError(f"session {session_id!r} not found (unknown, closed or expired)")
        return s

    def _check_room(self, tenant: str) -> None:
        """SessionLimitError unless one more session of `tenant` fits the global and the tenant's limits."""
        if len(self.sessions) >= self.max_sessions:
            raise SessionLimitError(f"the server has {len(self.sessions)} open sessions (limit {self.max_sessions}); "
                                    "close idle sessions or retry later")
        if self._sessions_of[tenant] >= self.max_sessions_per_tenant:
            raise SessionLimitError(f"this API key has {self._sessions_of[tenant]} open sessions (limit "
                                    f"{self.max_sessions_per_tenant}); close some first")

    def _add(self, s: Session) -> None:
        """Registers a new session (create, fork) within the global and the owner's session limits."""
        self._check_room(s.tenant)
        self.sessions[s.session_id] = s
        self._sessions_of[s.tenant] += 1

    def _new_id(self) -> str:
        return f"sess-{uuid.uuid4().hex[:20]}"


    # --- create / get / list / fork / close ---------------------------------------------------------
    async def create(self, messages: Sequence[dict[str, Any]] = (), *, tools: Optional[list[dict[str, Any]]] = None,
                     ttl_seconds: float = 0.0, cache_salt: Optional[str] = None, adapter: Optional[str] = None,
                     model: Optional[str] = None, raw_tokens: bool = False,
                     metadata: Optional[dict[str, str]] = None, tenant: str = ANONYMOUS_TENANT,
                     stored_response: bool = False, chat_template_kwargs: Optional[dict[str, Any]] = None
                     ) -> SessionSnapshot:
        pool, raw = self.render_pool, raw_tokens or not self.has_template
        pool.check_messages(messages)  # what cannot fit is refused before it waits for a worker
        rendered = await pool.run(lambda tok: R.prepare_create(pool, tok, messages, tools, raw=raw,
                                                               vocab_size=self.engine.arch.vocab_size,
                                                               template_kwargs=chat_template_kwargs))
        return await self._run(lambda: self.create_sync(
            messages, tools=tools, ttl_seconds=ttl_seconds, cache_salt=cache_salt, adapter=adapter, model=model,
            raw_tokens=raw_tokens, metadata=metadata, rendered=rendered, tenant=tenant,
            stored_response=stored_response, chat_template_kwargs=chat_template_kwargs))

    def create_sync(self, messages: Sequence[dict[str, Any]] = (), *, tools: Optional[list[dict[str, Any]]] = None,
                    ttl_seconds: float = 0.0, cache_salt: Optional[str] = None, adapter: Optional[str] = None,
                    model: Optional[str] = None, raw_tokens: bool = False,
                    metadata: Optional[dict[str, str]] = None, rendered: Optional[R.RenderedCreate] = None,
                    tenant: str = ANONYMOUS_TENANT, stored_response: bool = False,
                    chat_template_kwargs: Optional[dict[str, Any]] = None) -> SessionSnapshot:
        """Step thread. Adopts the initial messages as `create` rendered them in the render pool
        (rendered inline only without `rendered`); no KV yet: the first turn prefills them, finding
        any prefix other sessions share — a common system prompt and tools — in the prefix cache."""
        if not math.isfinite(ttl_seconds) or ttl_seconds < 0:  # NaN compares False with everything
            raise InvalidRequestError(f"ttl_seconds must be a finite number >= 0 (0: the server's default), "
                                      f"got {ttl_seconds}")
        self._check_room(tenant)  # before rendering: a refused session costs nothing
        raw = raw_tokens or not self.has_template
        if rendered is None:
            rendered = R.prepare_create(self.render_pool, self.tokenizer, messages, tools, raw=raw,
                                        vocab_size=self.engine.arch.vocab_size, template_kwargs=chat_template_kwargs)
        msgs = rendered.messages
        s = Session(session_id=self._new_id(), model=model or self.engine.model_name, adapter=adapter or None,
                    tools=rendered.tools, cache_salt=cache_salt or None, raw_tokens=raw,
                    ttl=ttl_seconds or self.default_ttl, metadata=dict(metadata or {}), tenant=tenant,
                    lora_key=self.engine.lora.resolve(adapter or None), stored_response=stored_response,
                    template_kwargs=rendered.template_kwargs)
        s.text, s.token_ids = rendered.text, rendered.token_ids
        if len(s.token_ids) >= self.engine.max_model_len:
            raise InvalidRequestError(f"the messages have {len(s.token_ids)} tokens; max_model_len is "
                                      f"{self.engine.max_model_len}")
        s.messages = msgs
        self._add(s)
        return snapshot_of(s)

    async def get(self, session_id: str, include_messages: bool = False,
                  include_token_ids: bool = False, *, tenant: str = ANONYMOUS_TENANT) -> SessionSnapshot:
        return await self._run(lambda: snapshot_of(self._owned(session_id, tenant), include_messages,
                                                   include_token_ids))

    async def list(self, *, tenant: str = ANONYMOUS_TENANT, after: Optional[SessionListCursor] = None,
                   limit: Optional[int] = None) -> list[SessionSnapshot]:
        """The tenant's open sessions in creation order (SessionListCursor): only those after `after`,
        and at most `limit` (None: all). A page continued from its last session's cursor shows every
        session still open exactly once; one created meanwhile shows if it sorts after the cursor."""
        if limit is not None and limit < 0:
            raise InvalidRequestError(f"limit must be >= 0, got {limit}")

        def page() -> list[SessionSnapshot]:
            owned = [s for s in self.sessions.values()
                     if s.tenant == tenant and (after is None or _list_cursor(s) > after)]
            # A page of k out of n sessions: O(n log k) on the step thread, not a sort of all n.
            chosen = (sorted(owned, key=_list_cursor) if limit is None
                      else heapq.nsmallest(limit, owned, key=_list_cursor))
            return [snapshot_of(s) for s in chosen]

        return await self._run(page)

    async def fork(self, session_id: str, *, ttl_seconds: float = 0.0, metadata: Optional[dict[str, str]] = None,
                   tenant: str = ANONYMOUS_TENANT) -> SessionSnapshot:
        return await self._run(lambda: self.fork_sync(session_id, ttl_seconds=ttl_seconds, metadata=metadata,
                                                      tenant=tenant))

    def fork_sync(self, session_id: str, *, ttl_seconds: float = 0.0, metadata: Optional[dict[str, str]] = None,
                  tenant: str = ANONYMOUS_TENANT) -> SessionSnapshot:
        """Step thread. The child (the parent's tenant's) shares every page of the parent
        (copy-on-write: the first write into a shared partial page copies that one page)."""
        p = self._owned(session_id, tenant)
        self.settle_ended_turn(p)
        if p.busy is not None:
            raise SessionBusyError(f"session {session_id!r} has a turn in flight; fork it after the turn")
        if not math.isfinite(ttl_seconds) or ttl_seconds < 0:  # NaN compares False with everything
            raise InvalidRequestError(f"ttl_seconds must be a finite number >= 0 (0: the server's default), "
                                      f"got {ttl_seconds}")
        self._check_room(p.tenant)
        c = Session(session_id=self._new_id(), model=p.model, adapter=p.adapter, lora_key=p.lora_key, tools=p.tools,
                    cache_salt=p.cache_salt, raw_tokens=p.raw_tokens, ttl=ttl_seconds or p.ttl,
                    metadata=dict(p.metadata if metadata is None else metadata), parent_id=p.session_id,
                    messages=list(p.messages), shown_replies=dict(p.shown_replies),
                    token_ids=list(p.token_ids), text=p.text, num_turns=p.num_turns,
                    tenant=p.tenant, stored_response=p.stored_response, template_kwargs=p.template_kwargs)
        self._add(c)
        self.residency.share(p, c)
        now = time.monotonic()  # a fork is activity on both: the parent's TTL restarts too
        p.mark_active(now)
        c.mark_active(now)
        return snapshot_of(c)

    async def close(self, session_id: str, *, tenant: str = ANONYMOUS_TENANT) -> SessionSnapshot:
        """Frees the session's pages. A turn in flight is cancelled (rolled back) first."""
        snap, pending = await self._run(lambda: self._close(self._owned(session_id, tenant).session_id))
        if pending is not None:
            if pending.task is not None:
                pending.task.cancel()
            if pending.ended is not None:
                await asyncio.shield(pending.ended.wait())
        return snap

    def _close(self, session_id: str) -> tuple[SessionSnapshot, Optional[PendingTurn]]:
        s = self.sessions.pop(session_id, None)
        if s is None:
            raise SessionNotFoundError(f"session {session_id!r} not found (unknown, closed or expired)")
        self._sessions_of[s.tenant] -= 1
        if not self._sessions_of[s.tenant]:
            del self._sessions_of[s.tenant]
        s.closed = True
        pending = s.busy
        if pending is not None:
            # Take the turn's request out now (its own references go with it) and stop the turn's
            # task, even when the caller of close never gets this far (cancelled meanwhile). A turn
            # admitted after this finds the session CLOSED and forks nothing from it.
            self.engine.abort(pending.request_id)
            if pending.task is not None and pending.loop is not None:
                pending.loop.call_soon_threadsafe(pending.task.cancel)
        self.residency.release(s)
        # The final state: a turn in flight is cancelled and rolled back before close returns, so not busy.
        return dataclasses.replace(snapshot_of(s), busy=False), pending

    async def close_all(self) -> None:
        for sid, s in list(self.sessions.items()):
            try:
                await self.close(sid, tenant=s.tenant)
            except SessionNotFoundError:
                pass

    # --- TTL ----------------------------------------------------------------------------------------
    def start(self) -> None:
        """Starts the periodic TTL expiry (call from the event loop)."""
        if self._expiry_task is None:
            self._expiry_task = asyncio.get_running_loop().create_task(self._expire_loop())

    async def stop(self) -> None:
        if self._expiry_task is not None:
            self._expiry_task.cancel()
            try:
                await self._expiry_task
            except asyncio.CancelledError:
                pass
            self._expiry_task = None

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(self.expiry_interval)
            try:
                await self._run(self.expire_idle)
            except EngineDeadError:
                return
            except Exception:  # noqa: BLE001 - keep expiring
                logger.exception("session expiry failed")

    def expire_idle(self, now: Optional[float] = None) -> int:
        """Step thread. Closes idle sessions past their TTL."""
        now = time.monotonic() if now is None else now
        expired = [s for s in self.sessions.values() if s.busy is None and now - s.last_active > s.ttl]
        for s in expired:
            self._close(s.session_id)
        self.stats.expired += len(expired)
        return len(expired)


def _list_cursor(s: Session) -> SessionListCursor:
    return SessionListCursor(s.created_at, s.session_id)
