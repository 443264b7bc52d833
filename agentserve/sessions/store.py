"""Sessions: conversations whose KV pages stay resident between agent turns.

A session holds its token history and a block table (references on KV pages). A turn is an engine
request whose prompt is the session's tokens plus the new messages' tokens; it starts from the
session's pages (shared copy-on-write, `share_prefix=True`) so only the new tokens are prefilled, and
when it finishes the engine hands its pages back (`Engine.on_retained`, on the step thread) and the
session adopts them in place of the old ones.

Threading: the engine is not thread-safe, so every operation that touches pages or session state runs
on the engine's step thread (through `AsyncEngine.run`, or inside the engine's hooks: the scheduler's
`reclaim` and `on_retained`). The async methods are thin wrappers around those step-thread functions.

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

Cancelling a turn: a turn that the engine had not finished when the cancel arrived is rolled back —
the session's tokens, messages and pages are exactly as before the turn (the turn ran on its own
copy-on-write references, which the abort frees). A turn the engine had already finished is kept
whole. Either way no page leaks and the session is not left busy, wherever the cancel lands: while
the turn's set-up is queued or running on the step thread (an undo queued behind it ends the turn),
queued for admission, mid-prefill or mid-decode. Closing a session with a turn in flight aborts the
turn's request and frees every page at once.

Ownership: a session belongs to the tenant that created it (its forks too); every public call takes
the caller's tenant, and another tenant's session is NOT_FOUND, exactly like an unknown one. Session
counts are bounded globally and per tenant (SessionLimitError, RESOURCE_EXHAUSTED).

Residency: between turns a session's pages are pinned. A turn's request takes the session's pages
only when the scheduler admits it (an admit hook, scheduler.AdmitHook): until then a queued turn
holds nothing of its own, and the scheduler admits it only when its whole prompt fits next to what
the running requests will claim, so running turns are rarely preempted. When pages run short the
scheduler calls `reclaim`, which takes pages from sessions before anything running is touched: first
idle sessions past their expected-next-turn hint, then those without a hint, then those expected
back soon (least recently used first within each group), and last the sessions whose turn is queued
but not admitted (the newest arrivals first). An evicted session's pages are copied to CPU swap
space (SWAPPED) — all but the leading pages that other owners still hold and that are findable by
hash (a common system prompt and tools, left to the prefix cache) — or, when swap is full,
dropped (EVICTED; their full pages stay findable by hash until reused, so the next turn recomputes
only what is gone). At admission a swapped session is copied back in, reusing leading pages still in
the prefix cache; its turn waits in the queue while running requests hold the pages it needs
(Timing.swap_wait_ms) rather than dropping the copy and recomputing.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import enum
import itertools
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Optional, Sequence, TypeVar, Union

from agentserve.cache.block_pool import compute_block_hashes
from agentserve.cache.swap_slots import SwapSlots
from agentserve.chat.render_pool import RenderPool
from agentserve.errors import EngineDeadError, InvalidRequestError, SessionError
from agentserve.engine.request import Request, RequestOutput
from agentserve.sampling_params import SamplingParams
from agentserve.chat import render as R
from agentserve.chat.reply import ReplyStream

if TYPE_CHECKING:
    from agentserve.engine.async_engine import AsyncEngine

logger = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_TTL_SECONDS = 1800.0
DEFAULT_MAX_SESSIONS = 8192
ANONYMOUS_TENANT = ""  # the owner of every session on a server without API keys


class SessionState(str, enum.Enum):
    NEW = "new"            # no KV computed yet
    RESIDENT = "resident"  # pages on the device
    SWAPPED = "swapped"    # pages in CPU swap space
    EVICTED = "evicted"    # pages dropped; recomputed (prefix cache helps) on the next turn
    CLOSED = "closed"


class SessionNotFoundError(SessionError):
    code = "NOT_FOUND"


class SessionBusyError(SessionError):
    code = "FAILED_PRECONDITION"


class TurnCancelledError(SessionError):
    code = "CANCELLED"


class SessionLimitError(SessionError):
    code = "RESOURCE_EXHAUSTED"


@dataclass
class TextEvent:
    text: str
    token_ids: list[int]


@dataclass
class ToolCallEvent:
    index: int
    id: str
    name: str
    arguments_delta: str


@dataclass
class Usage:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    prefilled_tokens: int = 0
    completion_tokens: int = 0
    swapped_in_tokens: int = 0


@dataclass
class Timing:
    queue_ms: float = 0.0
    prefill_ms: float = 0.0
    ttft_ms: float = 0.0
    decode_ms: float = 0.0
    total_ms: float = 0.0
    swap_in_ms: float = 0.0
    swap_wait_ms: float = 0.0


@dataclass
class SessionSnapshot:
    session_id: str
    model: str
    adapter: Optional[str]
    state: SessionState
    num_tokens: int
    num_kv_tokens: int
    num_pages: int
    num_swapped_pages: int
    num_turns: int
    num_messages: int
    busy: bool
    parent_id: Optional[str]
    created_at: float
    last_active_at: float
    expires_at: float
    ttl_seconds: float
    metadata: dict[str, str]
    raw_tokens: bool
    messages: Optional[list[dict[str, Any]]] = None
    token_ids: Optional[list[int]] = None


@dataclass
class TurnResult:
    message: dict[str, Any]  # the assistant's reply as the client sees it (content, tool_calls)
    finish_reason: str
    usage: Usage
    timing: Timing
    token_ids: list[int]
    prompt_token_ids: list[int]
    session: SessionSnapshot


TurnEvent = Union[TextEvent, ToolCallEvent, TurnResult]


@dataclass
class SessionStats:
    turns: int = 0
    rolled_back: int = 0
    swap_outs: int = 0
    swap_ins: int = 0
    swap_in_failures: int = 0  # swapped, but the shared prefix was gone or no pages: recomputed
    drops: int = 0             # evicted without swap (full or no swap space)
    queued_evicted: int = 0    # sessions evicted while their turn was queued (the pool was short even so)
    rerenders: int = 0         # the template re-rendered history differently: re-tokenized
    expired: int = 0
    pages_swapped_out: int = 0
    pages_swapped_in: int = 0


# --- sessions ---------------------------------------------------------------------------------------
@dataclass(eq=False)
class Session:
    session_id: str
    model: str
    adapter: Optional[str]
    tools: Optional[list[dict[str, Any]]]
    cache_salt: Optional[str]
    raw_tokens: bool
    ttl: float
    metadata: dict[str, str]
    parent_id: Optional[str] = None
    messages: list[dict[str, Any]] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    text: str = ""  # what token_ids decode to (template sessions)
    state: SessionState = SessionState.NEW
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0  # leading tokens whose KV is in block_table (or in swap when SWAPPED)
    swap_slots: list[int] = field(default_factory=list)  # CPU swap slots of pages [swap_from:] (SWAPPED)
    swap_from: int = 0  # leading pages left to the prefix cache when swapped out
    busy: Optional["PendingTurn"] = None
    closed: bool = False
    num_turns: int = 0
    created_at: float = field(default_factory=time.time)
    last_active: float = field(default_factory=time.monotonic)
    last_active_wall: float = field(default_factory=time.time)
    expected_by: Optional[float] = None  # monotonic deadline from the expected_next_turn_ms hint
    tenant: str = ANONYMOUS_TENANT  # the owner: other tenants cannot see or touch the session

    @property
    def extra_key(self) -> Optional[tuple[Optional[str], Optional[str]]]:
        # Mirrors kv_cache_manager.extra_key_of for the session's requests.
        if self.adapter is None and self.cache_salt is None:
            return None
        return (self.adapter, self.cache_salt)


@dataclass(eq=False)
class PendingTurn:
    session: Session
    request_id: str
    prompt_token_ids: list[int]
    prompt_text: str
    new_messages: list[dict[str, Any]]
    content_prefix: str
    params: SamplingParams
    expected_next_turn_ms: float
    received_at: float
    began_at: float = field(default_factory=time.monotonic)
    swap_in_ms: float = 0.0
    swap_wait_ms: float = 0.0
    swapped_in_tokens: int = 0
    committed: bool = False
    result_message: Optional[dict[str, Any]] = None
    snapshot: Optional[SessionSnapshot] = None
    task: Optional["asyncio.Task[None]"] = None
    loop: Optional[asyncio.AbstractEventLoop] = None  # the loop running `task`
    ended: Optional[asyncio.Event] = None


_SENTINEL_DONE = object()


class SessionStore:
    def __init__(self, async_engine: "AsyncEngine", *, default_ttl: float = DEFAULT_TTL_SECONDS,
                 expiry_interval: float = 1.0, render_pool: Optional[RenderPool] = None,
                 max_sessions: int = DEFAULT_MAX_SESSIONS, max_sessions_per_tenant: Optional[int] = None) -> None:
        self.aeng = async_engine
        self.engine = engine = async_engine.engine
        # Rendering and tokenizing grow with the input: they run here, never on the step thread.
        self.render_pool = render_pool or RenderPool(engine.tokenizer, engine.max_model_len, engine.config.server)
        self.pool = engine.pool
        self.kv_cache = engine.runner.kv_cache
        self.block_size = engine.pool.block_size
        self.tokenizer = engine.tokenizer
        self.has_template = R.has_chat_template(self.tokenizer)
        self.default_ttl = default_ttl
        self.expiry_interval = expiry_interval
        self.sessions: dict[str, Session] = {}
        self.max_sessions = max_sessions
        self.max_sessions_per_tenant = max_sessions_per_tenant or max_sessions
        self._sessions_of: collections.Counter[str] = collections.Counter()  # tenant -> open sessions
        self._pending: dict[str, PendingTurn] = {}  # request id -> turn in flight
        self._swap = SwapSlots(self.kv_cache.num_swap_blocks)
        self.stats = SessionStats()
        self._ids = itertools.count()
        self._expiry_task: Optional[asyncio.Task[None]] = None
        if getattr(engine, "session_store", None) is not None:
            raise RuntimeError("this engine already has a session store")
        engine.session_store = self
        engine.scheduler.reclaim = self._reclaim
        engine.on_retained = self._on_retained

    def detach(self) -> None:
        """Unhooks the store from the engine (after close_all), so the engine can serve another store."""
        if getattr(self.engine, "session_store", None) is self:
            self.engine.scheduler.reclaim = None
            self.engine.on_retained = None
            self.engine.session_store = None

    # --- plumbing -----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.sessions)

    @property
    def num_swap_slots(self) -> int:
        return self.kv_cache.num_swap_blocks

    @property
    def num_free_swap_slots(self) -> int:
        return self._swap.num_free

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
            if s.state in (SessionState.NEW, SessionState.RESIDENT, SessionState.SWAPPED, SessionState.EVICTED):
                counts[s.state.value] += 1
        return counts

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

    def _snapshot(self, s: Session, include_messages: bool = False, include_token_ids: bool = False) -> SessionSnapshot:
        kv = s.num_computed if s.state in (SessionState.RESIDENT, SessionState.SWAPPED) else 0
        return SessionSnapshot(
            session_id=s.session_id, model=s.model, adapter=s.adapter, state=s.state, num_tokens=len(s.token_ids),
            num_kv_tokens=kv, num_pages=len(s.block_table), num_swapped_pages=len(s.swap_slots),
            num_turns=s.num_turns, num_messages=len(s.messages), busy=s.busy is not None, parent_id=s.parent_id,
            created_at=s.created_at, last_active_at=s.last_active_wall, expires_at=s.last_active_wall + s.ttl,
            ttl_seconds=s.ttl, metadata=dict(s.metadata), raw_tokens=s.raw_tokens,
            messages=[dict(m) for m in s.messages] if include_messages else None,
            token_ids=list(s.token_ids) if include_token_ids else None)

    def _new_id(self) -> str:
        return f"sess-{uuid.uuid4().hex[:20]}"

    # --- create / get / list / fork / close ---------------------------------------------------------
    async def create(self, messages: Sequence[dict[str, Any]] = (), *, tools: Optional[list[dict[str, Any]]] = None,
                     ttl_seconds: float = 0.0, cache_salt: Optional[str] = None, adapter: Optional[str] = None,
                     model: Optional[str] = None, raw_tokens: bool = False,
                     metadata: Optional[dict[str, str]] = None, tenant: str = ANONYMOUS_TENANT) -> SessionSnapshot:
        pool, raw = self.render_pool, raw_tokens or not self.has_template
        pool.check_messages(messages)  # what cannot fit is refused before it waits for a worker
        rendered = await pool.run(lambda tok: R.prepare_create(pool, tok, messages, tools, raw=raw,
                                                               vocab_size=self.engine.arch.vocab_size))
        return await self._run(lambda: self.create_sync(
            messages, tools=tools, ttl_seconds=ttl_seconds, cache_salt=cache_salt, adapter=adapter, model=model,
            raw_tokens=raw_tokens, metadata=metadata, rendered=rendered, tenant=tenant))

    def create_sync(self, messages: Sequence[dict[str, Any]] = (), *, tools: Optional[list[dict[str, Any]]] = None,
                    ttl_seconds: float = 0.0, cache_salt: Optional[str] = None, adapter: Optional[str] = None,
                    model: Optional[str] = None, raw_tokens: bool = False,
                    metadata: Optional[dict[str, str]] = None, rendered: Optional[R.RenderedCreate] = None,
                    tenant: str = ANONYMOUS_TENANT) -> SessionSnapshot:
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
                                        vocab_size=self.engine.arch.vocab_size)
        msgs = rendered.messages
        s = Session(session_id=self._new_id(), model=model or self.engine.model_name, adapter=adapter or None,
                    tools=rendered.tools, cache_salt=cache_salt or None, raw_tokens=raw,
                    ttl=ttl_seconds or self.default_ttl, metadata=dict(metadata or {}), tenant=tenant)
        s.text, s.token_ids = rendered.text, rendered.token_ids
        if len(s.token_ids) >= self.engine.max_model_len:
            raise InvalidRequestError(f"the messages have {len(s.token_ids)} tokens; max_model_len is "
                                      f"{self.engine.max_model_len}")
        s.messages = msgs
        self._add(s)
        return self._snapshot(s)

    async def get(self, session_id: str, include_messages: bool = False,
                  include_token_ids: bool = False, *, tenant: str = ANONYMOUS_TENANT) -> SessionSnapshot:
        return await self._run(lambda: self._snapshot(self._owned(session_id, tenant), include_messages,
                                                      include_token_ids))

    async def list(self, *, tenant: str = ANONYMOUS_TENANT) -> list[SessionSnapshot]:
        return await self._run(lambda: [self._snapshot(s) for s in self.sessions.values() if s.tenant == tenant])

    async def fork(self, session_id: str, *, ttl_seconds: float = 0.0, metadata: Optional[dict[str, str]] = None,
                   tenant: str = ANONYMOUS_TENANT) -> SessionSnapshot:
        return await self._run(lambda: self.fork_sync(session_id, ttl_seconds=ttl_seconds, metadata=metadata,
                                                      tenant=tenant))

    def fork_sync(self, session_id: str, *, ttl_seconds: float = 0.0, metadata: Optional[dict[str, str]] = None,
                  tenant: str = ANONYMOUS_TENANT) -> SessionSnapshot:
        """Step thread. The child (the parent's tenant's) shares every page of the parent
        (copy-on-write: the first write into a shared partial page copies that one page)."""
        p = self._owned(session_id, tenant)
        if p.busy is not None:
            raise SessionBusyError(f"session {session_id!r} has a turn in flight; fork it after the turn")
        if not math.isfinite(ttl_seconds) or ttl_seconds < 0:  # NaN compares False with everything
            raise InvalidRequestError(f"ttl_seconds must be a finite number >= 0 (0: the server's default), "
                                      f"got {ttl_seconds}")
        self._check_room(p.tenant)
        if p.state is SessionState.SWAPPED:
            self._swap_in(p)
        c = Session(session_id=self._new_id(), model=p.model, adapter=p.adapter, tools=p.tools,
                    cache_salt=p.cache_salt, raw_tokens=p.raw_tokens, ttl=ttl_seconds or p.ttl,
                    metadata=dict(p.metadata if metadata is None else metadata), parent_id=p.session_id,
                    messages=list(p.messages), token_ids=list(p.token_ids), text=p.text, num_turns=p.num_turns,
                    tenant=p.tenant)
        self._add(c)
        if p.state is SessionState.RESIDENT:
            c.block_table = self.engine.kv.fork_blocks(p.block_table)
            c.num_computed = p.num_computed
            c.state = SessionState.RESIDENT
        else:
            c.state = p.state  # NEW or EVICTED: nothing to share; the prefix cache may still hold pages
        now = time.monotonic()
        p.last_active = c.last_active = now
        return self._snapshot(c)

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
        self._release(s)
        return self._snapshot(s), pending

    async def close_all(self) -> None:
        for sid, s in list(self.sessions.items()):
            try:
                await self.close(sid, tenant=s.tenant)
            except SessionNotFoundError:
                pass

    def _release(self, s: Session) -> None:
        if s.block_table:
            self.pool.free(s.block_table)
            s.block_table = []
        self._free_swap(s)
        s.num_computed = 0
        s.state = SessionState.CLOSED

    def _free_swap(self, s: Session) -> None:
        self._swap.free(s.swap_slots)
        s.swap_slots = []
        s.swap_from = 0

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

    # --- residency (step thread) -------------------------------------------------------------------
    def _eviction_order(self, exclude: Optional[Session] = None) -> list[Session]:
        now = time.monotonic()

        def key(s: Session) -> tuple[int, float]:
            if s.expected_by is None:
                group = 1
            elif now > s.expected_by:
                group = 0
            else:
                group = 2
            return (group, s.last_active)

        idle = [s for s in self.sessions.values()
                if s is not exclude and s.busy is None and s.state is SessionState.RESIDENT and s.block_table]
        return sorted(idle, key=key)

    def _reclaim(self, wanted: int, request: Optional[Request] = None, exclude: Optional[Session] = None) -> int:
        """The scheduler's hook: frees up to `wanted` pages (at least that many if it can) by evicting
        sessions; the session of `request` (the one asking) is left alone. Returns the pages freed."""
        if request is not None and exclude is None:
            asking = self._pending.get(request.parent_id)
            exclude = asking.session if asking is not None else None
        freed = 0
        # Idle sessions, then sessions whose turn is still queued (they get their pages back at
        # admission, from swap). First the sessions whose eviction frees pages now; then, if that was
        # not enough, the ones whose pages are all shared (dropping their references lets the other
        # owners' pages go).
        order = self._eviction_order(exclude) + self._queued_turn_sessions(exclude)
        for zero_gain_pass in (False, True):
            for s in order:
                if freed >= wanted:
                    return freed
                if s.state is not SessionState.RESIDENT or not s.block_table:
                    continue
                exclusive = sum(1 for b in s.block_table if self.pool.ref_cnt(b) == 1)
                if exclusive == 0 and not zero_gain_pass:
                    continue
                freed += self._evict(s)
                self.stats.queued_evicted += s.busy is not None
        return freed

    def _queued_turn_sessions(self, exclude: Optional[Session]) -> list[Session]:
        """Resident sessions whose turn waits in the queue without its pages yet, newest arrival first."""
        queued = []
        for req in reversed(self.engine.scheduler.waiting):
            pending = self._pending.get(req.parent_id)
            if pending is None or req.admit_hook is None:
                continue
            s = pending.session
            if s is not exclude and s.state is SessionState.RESIDENT and s.block_table:
                queued.append(s)
        return queued

    def _evict(self, s: Session) -> int:
        """Swaps the session's pages out to CPU, or drops them when swap is full. Leading pages that
        other owners still hold and that are findable by hash (a common system prompt and tools) stay
        on the device: the swap-in finds them in the prefix cache, and a preamble shared by many
        agents is neither copied out and back on every eviction nor stored in swap once per agent.
        Returns the pages freed on the device."""
        table = s.block_table
        exclusive = sum(1 for b in table if self.pool.ref_cnt(b) == 1)
        swap_from: Optional[int] = None
        if self.num_swap_slots > 0:
            k = 0
            while (k < len(table) and self.pool.ref_cnt(table[k]) > 1
                   and self.pool.blocks[table[k]].block_hash is not None):
                k += 1
            if len(table) - k <= self._swap.num_free:
                swap_from = k
        if swap_from is not None:
            slots = self._swap.allocate(len(table) - swap_from)
            if slots:
                self.kv_cache.swap_out(table[swap_from:], slots)
            s.swap_slots = slots
            s.swap_from = swap_from
            s.state = SessionState.SWAPPED
            self.stats.swap_outs += 1
            self.stats.pages_swapped_out += len(slots)
        else:
            s.state = SessionState.EVICTED
            s.num_computed = 0
            self.stats.drops += 1
        self.pool.free(table)
        s.block_table = []
        return exclusive

    def _swap_in_plan(self, s: Session, count: bool) -> tuple[list[int], list[int], int]:
        """(hashes of the session's full pages, leading pages of them still in the prefix cache, #full)."""
        num_full = min(s.num_computed // self.block_size, s.swap_from + len(s.swap_slots))
        hashes: list[int] = []
        if self.pool.enable_prefix_caching and num_full:
            hashes = compute_block_hashes(s.token_ids[:num_full * self.block_size], self.block_size, s.extra_key, [])
        hits = self.pool.lookup(hashes, num_full, num_full * self.block_size if count else 0) if hashes else []
        if not count:
            self.pool.hit_tokens -= len(hits) * self.block_size  # a probe, not a prefix-cache query
        return hashes, hits, num_full

    def _restore_cost(self, s: Session) -> tuple[int, int]:
        """(free pages a swap-in of `s` takes, pages it then holds); (0, 0) when the swap-in cannot work
        (pages left to the prefix cache are gone: the turn recomputes)."""
        _, hits, _ = self._swap_in_plan(s, count=False)
        if len(hits) < s.swap_from:
            return 0, 0
        total = s.swap_from + len(s.swap_slots)
        return total - len(hits) + sum(1 for b in hits if self.pool.ref_cnt(b) == 0), total

    def _swap_in(self, s: Session) -> bool:
        """Restores a swapped session's pages: leading full pages still in the prefix cache are
        reused as they are, the rest are copied back from swap. On failure (pages that were left to
        the prefix cache are gone, or no free pages even after evicting other idle sessions) the
        session becomes EVICTED: its turn recomputes, with whatever the prefix cache still holds."""
        hashes, hits, num_full = self._swap_in_plan(s, count=True)
        ok = len(hits) >= s.swap_from
        copy = s.swap_from + len(s.swap_slots) - len(hits)

        def need() -> int:
            return copy + sum(1 for b in hits if self.pool.ref_cnt(b) == 0)

        if ok and need() > self.pool.num_free_blocks:
            self._reclaim(need() - self.pool.num_free_blocks, exclude=s)
        if not ok or need() > self.pool.num_free_blocks:
            self._free_swap(s)
            s.state = SessionState.EVICTED
            s.num_computed = 0
            self.stats.swap_in_failures += 1
            return False
        self.pool.touch(hits)
        fresh = self.pool.allocate(copy)
        if copy:
            self.kv_cache.swap_in(s.swap_slots[len(hits) - s.swap_from:], fresh)
        s.block_table = list(hits) + fresh
        self._free_swap(s)
        s.state = SessionState.RESIDENT
        self.stats.swap_ins += 1
        self.stats.pages_swapped_in += copy
        # Restored full pages become findable by hash again (forks, evicted-recompute paths).
        for i in range(len(hits), min(num_full, len(hashes))):
            self.pool.cache_block(s.block_table[i], hashes[i])
        return True

    # --- turns ----------------------------------------------------------------------------------------
    def _reserve_turn(self, session_id: str, params: SamplingParams, expected_next_turn_ms: float,
                      received_at: float) -> tuple[PendingTurn, R.TurnBasis]:
        """Step thread, constant time: marks the session busy as its turn arrives, as a turn rendered
        here used to (eviction then counts it as a session with a turn on its way), and reads the
        history the turn renders on — which cannot change while the session is busy. The turn's
        prompt is rendered off this thread; `_begin_turn` adopts it, `_abandon_turn` undoes this."""
        s = self._get(session_id)
        if s.busy is not None:
            raise SessionBusyError(f"session {session_id!r} already has a turn in flight")
        if not math.isfinite(expected_next_turn_ms) or expected_next_turn_ms < 0:
            raise InvalidRequestError(f"expected_next_turn_ms must be a finite number >= 0 (0: no hint), "
                                      f"got {expected_next_turn_ms}")
        pending = PendingTurn(session=s, request_id=f"{s.session_id}/t{s.num_turns}-{next(self._ids)}",
                              prompt_token_ids=[], prompt_text="", new_messages=[], content_prefix="", params=params,
                              expected_next_turn_ms=expected_next_turn_ms, received_at=received_at)
        s.busy = pending  # from here on only the last resort of reclaim evicts it (until admitted)
        return pending, R.TurnBasis(s.messages, s.text, s.token_ids, s.tools, s.raw_tokens)

    def _abandon_turn(self, pending: PendingTurn) -> None:
        """Step thread: a turn that failed or was cancelled before `_begin_turn` put it in the engine
        gives its session back (releasing it if it was closed meanwhile)."""
        self._pending.pop(pending.request_id, None)  # _begin_turn may have run (a cancel while it was queued)
        s = pending.session
        if s.busy is pending:
            s.busy = None
        if s.closed and s.busy is None:
            self._release(s)

    async def _render_turn(self, basis: R.TurnBasis, messages: Sequence[dict[str, Any]]) -> R.RenderedTurn:
        """The turn's prompt, rendered and tokenized in the render pool (not on the step thread)."""
        pool = self.render_pool
        if not basis.raw_tokens:
            pool.check_messages(messages)  # what cannot fit is refused before it waits for a worker
        return await pool.run(lambda tok: R.prepare_turn(pool, tok, basis, messages, self.engine.arch.vocab_size))

    def _begin_turn(self, pending: PendingTurn, rendered: R.RenderedTurn) -> PendingTurn:
        """Step thread. Adopts the turn's prompt (as `_render_turn` built it) and validates it; the
        session's pages go to the turn's request at admission (`_admit`). Nothing about the session
        changes when this raises (the caller then abandons the turn)."""
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
        if params.max_tokens is None:
            room = min(self.engine.max_model_len, self.pool.num_blocks * self.block_size) - len(prompt)
            params = params.clone(max_tokens=max(1, room))
        params = self.engine.validate(prompt, params)
        if params.n != 1:
            raise InvalidRequestError("n must be 1 for a session turn; fork the session for parallel replies")
        self.stats.rerenders += rerendered
        pending.prompt_token_ids, pending.prompt_text, pending.new_messages = prompt, prompt_text, new
        pending.content_prefix, pending.params = rendered.content_prefix, params
        if keep < s.num_computed:
            # Keep only the KV of the common prefix (the pages past it are released).
            if s.state is SessionState.RESIDENT:
                pages = -(-keep // self.block_size)
                self.pool.free(s.block_table[pages:])
                s.block_table = s.block_table[:pages]
                s.num_computed = keep
            elif s.state is SessionState.SWAPPED:  # rare (a re-render of a swapped session): recompute
                self._free_swap(s)
                s.state = SessionState.EVICTED
                s.num_computed = 0
        self._pending[pending.request_id] = pending
        return pending

    def _admit(self, pending: PendingTurn, request: Request) -> None:
        """Step thread (the scheduler's admit hook): the turn's request takes its own copy-on-write
        references to the session's pages, after swapping them back in if they were moved out."""
        s = pending.session
        if s.state is SessionState.SWAPPED:
            pending.swap_wait_ms = (time.monotonic() - pending.began_at) * 1e3
            t0 = time.perf_counter()
            if self._swap_in(s):
                pending.swapped_in_tokens = s.num_computed
            pending.swap_in_ms = (time.perf_counter() - t0) * 1e3
        if s.state is SessionState.RESIDENT and s.num_computed > 0:
            request.block_table = self.engine.kv.fork_blocks(s.block_table)
            request.num_computed_tokens = request.num_cached_tokens = s.num_computed

    def _on_retained(self, out: RequestOutput) -> None:
        """Engine hook (step thread): a turn finished; the session adopts the turn's pages."""
        pending = self._pending.pop(out.request_id, None)
        if pending is None or out.retained_block_table is None:
            return
        table, num_computed = out.retained_block_table, out.retained_num_computed_tokens
        out.retained_block_table = None
        s = pending.session
        if s.closed or out.error or out.outputs[0].finish_reason == "error":
            self.pool.free(table)  # closed meanwhile, or the turn failed (e.g. its grammar): rolled back
            return
        comp = out.outputs[0]
        output_ids = list(comp.token_ids)
        if s.block_table:
            self.pool.free(s.block_table)
        self._free_swap(s)
        s.block_table = table
        s.num_computed = num_computed
        s.token_ids = pending.prompt_token_ids + output_ids
        history_msg, client_msg = self._assistant_messages(s, comp, pending)
        if not s.raw_tokens:
            s.text = pending.prompt_text + R.decode_continuation(self.tokenizer, pending.prompt_token_ids, output_ids)
        s.messages = s.messages + pending.new_messages + [history_msg]
        s.state = SessionState.RESIDENT
        s.num_turns += 1
        now = time.monotonic()
        s.last_active, s.last_active_wall = now, time.time()
        s.expected_by = now + pending.expected_next_turn_ms / 1e3 if pending.expected_next_turn_ms > 0 else None
        pending.committed = True
        pending.result_message = client_msg
        s.busy = None
        pending.snapshot = self._snapshot(s)
        self.stats.turns += 1

    def _assistant_messages(self, s: Session, comp: Any, pending: PendingTurn) -> tuple[dict[str, Any], dict[str, Any]]:
        """(the reply as the session's history keeps it, the reply as the client sees it)."""
        ids = list(comp.token_ids)
        if s.raw_tokens:
            return {"role": "assistant", "token_ids": ids}, {"role": "assistant", "content": comp.text or ""}
        # History: the model's own text with special tokens spelled out (so the template re-renders
        # it as generated), minus a final stop token, which the template writes as its end marker.
        if comp.finish_reason == "stop" and not isinstance(comp.stop_reason, str) and ids:
            ids = ids[:-1]
        raw_text = R.decode_continuation(self.tokenizer, pending.prompt_token_ids, ids)
        prefix = pending.content_prefix
        if prefix and raw_text.startswith(prefix):
            raw_text = raw_text[len(prefix):]  # the template writes it back (Llama 2's ' ' after [/INST])
        history = {"role": "assistant", "content": raw_text or None}
        client = {"role": "assistant", "content": comp.text or ""}
        if history["content"] is None:
            history["content"] = ""
        return history, client

    def _end_turn(self, pending: PendingTurn) -> None:
        """Step thread, always last for a turn: takes the request out of the engine if it is still
        there (cancel, error) — which rolls the turn back — and releases a session closed meanwhile."""
        self.engine.abort(pending.request_id)
        self._pending.pop(pending.request_id, None)
        s = pending.session
        if s.busy is pending:
            s.busy = None
            self.stats.rolled_back += 1
        if s.closed and s.busy is None:
            self._release(s)

    async def turn(self, session_id: str, messages: Sequence[dict[str, Any]], params: Optional[SamplingParams] = None,
                   *, expected_next_turn_ms: float = 0.0, priority: int = 0, received_at: Optional[float] = None,
                   tenant: str = ANONYMOUS_TENANT) -> AsyncIterator[TurnEvent]:
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
            self._call_soon(lambda: [self._abandon_turn(p) for p in reserved])
            raise
        try:
            rendered = await self._render_turn(basis, messages)
            await self._run(lambda: self._begin_turn(pending, rendered))
        except BaseException:
            self._call_soon(lambda: self._abandon_turn(pending))
            raise
        queue: asyncio.Queue[Any] = asyncio.Queue()
        pending.ended = asyncio.Event()
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
                pending.ended.set()  # type: ignore[union-attr]
                return
            fut.add_done_callback(lambda _f: loop.call_soon_threadsafe(pending.ended.set))  # type: ignore[union-attr]

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
                await asyncio.shield(pending.ended.wait())
            except asyncio.CancelledError:
                pass

    async def _drive(self, pending: PendingTurn, queue: "asyncio.Queue[Any]", priority: int) -> None:
        s = pending.session
        kwargs: dict[str, Any] = dict(retain_blocks=True, share_prefix=True, priority=priority,
                                      cache_salt=s.cache_salt, lora_name=s.adapter)
        kwargs["admit_hook"] = _TurnAdmission(self, pending)
        reply = ReplyStream(self.engine.tokenizer, pending.prompt_token_ids, pending.params, s.tools)
        gen = self.aeng.generate(pending.request_id, pending.prompt_token_ids, pending.params, **kwargs)
        try:
            async for out in gen:
                comp = out.outputs[0]
                text, calls = reply.feed(out)
                for c in calls:
                    queue.put_nowait(ToolCallEvent(c.index, c.id, c.name, c.arguments_delta))
                if text or comp.delta_token_ids:
                    queue.put_nowait(TextEvent(text, list(comp.delta_token_ids)))
                if out.finished and (out.error or comp.finish_reason == "error"):
                    if not comp.token_ids:  # failed before generating: its constraint did not compile
                        raise InvalidRequestError(out.error or "the turn failed")
                    raise RuntimeError(out.error or "the turn failed")
                if out.finished:
                    result = self._result(pending, out)
                    content, tool_calls = reply.final()
                    if content is not None:
                        result.message = dict(result.message, content=content)
                    if tool_calls:
                        result.message["tool_calls"] = tool_calls
                        if result.finish_reason == "stop":
                            result.finish_reason = "tool_calls"
                    queue.put_nowait(result)
                    queue.put_nowait(_SENTINEL_DONE)
                    return
        finally:
            await gen.aclose()
        raise RuntimeError("the engine ended the turn without a final output")

    def _result(self, pending: PendingTurn, out: RequestOutput) -> TurnResult:
        comp = out.outputs[0]
        if pending.session.closed and not pending.committed:
            raise TurnCancelledError("the session was closed during the turn")
        if not pending.committed or pending.snapshot is None or pending.result_message is None:
            raise RuntimeError(f"turn {pending.request_id} finished without handing its pages back")
        m = out.metrics
        timing = Timing(swap_in_ms=pending.swap_in_ms, swap_wait_ms=pending.swap_wait_ms, total_ms=(time.monotonic() - pending.received_at) * 1e3)
        if m is not None:
            if m.first_scheduled_time is not None:
                timing.queue_ms = (m.first_scheduled_time - m.arrival_time) * 1e3
                if m.first_token_time is not None:
                    timing.prefill_ms = (m.first_token_time - m.first_scheduled_time) * 1e3
            if m.first_token_time is not None:
                timing.ttft_ms = (m.first_token_time - pending.received_at) * 1e3
                if m.finished_time is not None:
                    timing.decode_ms = (m.finished_time - m.first_token_time) * 1e3
        usage = Usage(prompt_tokens=len(pending.prompt_token_ids),
                      cached_tokens=m.num_cached_tokens if m else 0,
                      prefilled_tokens=m.num_prefilled_tokens if m else 0,
                      completion_tokens=len(comp.token_ids), swapped_in_tokens=pending.swapped_in_tokens)
        return TurnResult(message=pending.result_message, finish_reason=comp.finish_reason or "stop", usage=usage,
                          timing=timing, token_ids=list(comp.token_ids),
                          prompt_token_ids=list(pending.prompt_token_ids), session=pending.snapshot)


class _TurnAdmission:
    """scheduler.AdmitHook for a session turn (runs on the step thread, inside schedule())."""

    def __init__(self, store: SessionStore, pending: PendingTurn) -> None:
        self.store = store
        self.pending = pending

    def pages_to_restore(self) -> tuple[int, int]:
        s = self.pending.session
        if s.state is SessionState.RESIDENT:
            return 0, len(s.block_table)
        if s.state is SessionState.SWAPPED:
            return self.store._restore_cost(s)
        return 0, 0

    def restore(self, request: Request) -> None:
        self.store._admit(self.pending, request)
