"""What sessions are made of and what their calls return: Session and its state, a turn in flight,
the events a turn streams, usage and timing, snapshots for clients, counters and the session errors.

A Session's fields are touched only on the engine's step thread (sessions/store.py says why), except
the immutable ones (tools, tenant) and `state`, which residency counts read from any thread.
"""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional, Union

from agentserve.chat.reasoning import ReplyReasoning
from agentserve.chat.reply import CallDelta, ReplyPiece
from agentserve.errors import SessionError
from agentserve.lora.key import LoRAKey
from agentserve.outputs import CompletionOutput, PositionLogprobs, RequestMetrics
from agentserve.sampling_params import SamplingParams

DEFAULT_TTL_SECONDS = 1800.0
DEFAULT_MAX_SESSIONS = 8192
ANONYMOUS_TENANT = ""  # the owner of every session on a server without API keys


class SessionState(str, enum.Enum):
    NEW = "new"            # no KV computed yet
    RESIDENT = "resident"  # pages on the device
    SWAPPED = "swapped"    # pages in CPU swap space
    EVICTED = "evicted"    # pages dropped; recomputed (prefix cache helps) on the next turn
    CLOSED = "closed"


# --- errors -------------------------------------------------------------------------------------------


class SessionNotFoundError(SessionError):
    code = "NOT_FOUND"


class SessionBusyError(SessionError):
    code = "FAILED_PRECONDITION"


class TurnCancelledError(SessionError):
    code = "CANCELLED"


class SessionLimitError(SessionError):
    code = "RESOURCE_EXHAUSTED"


# --- what a turn streams and returns ------------------------------------------------------------------
@dataclass(frozen=True)
class ReplyParts:
    """A reply's text (or a delta of it) split by the engine's reasoning parser (--reasoning-parser), the
    markers dropped: what the APIs that report reasoning apart (Responses' reasoning items) show."""
    reasoning: str
    content: str
    # A streamed delta's token ids split the same way (ReasoningMarkers.split_token_ids); empty on a whole reply.
    reasoning_token_ids: tuple[int, ...] = ()
    content_token_ids: tuple[int, ...] = ()
    # Those tokens' logprobs, split the same way (None unless the request asked for logprobs).
    reasoning_logprobs: Optional[tuple[PositionLogprobs, ...]] = None
    content_logprobs: Optional[tuple[PositionLogprobs, ...]] = None


@dataclass
class TextEvent:
    text: str
    token_ids: list[int]
    parts: Optional[ReplyParts] = None  # `text` split, with a reasoning parser; None without one
    # Per token of `token_ids`, its logprob and the top alternatives (SamplingParams.logprobs); None unless asked.
    logprobs: Optional[list[PositionLogprobs]] = None

    @classmethod
    def of_output(cls, comp: CompletionOutput, text: str, thoughts: Optional[ReplyReasoning]) -> "TextEvent":
        """What a streamed output added: `text` (the reply's, tool calls parsed out), its new tokens and
        their logprobs (a streamed output's `logprobs` covers every token so far: the new ones are its
        tail), split into thinking and answer by `thoughts` (with a reasoning parser)."""
        new = list(comp.delta_token_ids)
        logprobs = comp.logprobs[len(comp.token_ids) - len(new):len(comp.token_ids)] if comp.logprobs is not None else None
        parts = ReplyParts(*thoughts.feed(text, new, logprobs)) if thoughts is not None else None
        return cls(text, new, parts, logprobs)

    @classmethod
    def of_pieces(cls, comp: CompletionOutput, pieces: list[ReplyPiece], thoughts: Optional[ReplyReasoning]
                  ) -> list[Union["TextEvent", CallDelta]]:
        """One output's text and call deltas (ReplyStream.feed) as events, in the reply's order; the output's
        new tokens and logprobs go with its first text, or after its calls when it has no text."""
        events: list[Union[TextEvent, CallDelta]] = []
        carried = False
        for piece in pieces:
            if isinstance(piece, CallDelta):
                events.append(piece)
                continue
            if carried:  # text after a call in the same output: no tokens of its own
                parts = ReplyParts(*thoughts.feed(piece, ())) if thoughts is not None else None
                event = cls(piece, [], parts, [] if comp.logprobs is not None else None)
            else:
                event, carried = cls.of_output(comp, piece, thoughts), True
            if event.text or event.token_ids:
                events.append(event)
        if not carried and comp.delta_token_ids:
            events.append(cls.of_output(comp, "", thoughts))
        return events


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
    reasoning_tokens: int = 0  # of the completion's, inside a reasoning block (with a reasoning parser)


@dataclass
class Timing:
    queue_ms: float = 0.0
    prefill_ms: float = 0.0
    ttft_ms: float = 0.0
    decode_ms: float = 0.0
    total_ms: float = 0.0
    swap_in_ms: float = 0.0
    swap_wait_ms: float = 0.0


def timing_from_metrics(metrics: Optional[RequestMetrics], received_at: float) -> Timing:
    """A finished request's phases; `received_at` (monotonic) is when the server got the call."""
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
    template_kwargs: dict[str, Any] = field(default_factory=dict)


class SessionListCursor(NamedTuple):
    """A session's place in its tenant's list: creation order, ties broken by id. It never changes for a
    session, so a list resumed after a cursor neither repeats nor skips a session that is still open,
    whatever was created or closed meanwhile (sessions/store.py `list`, ListSessions' page tokens)."""
    created_at: float
    session_id: str


@dataclass
class TurnResult:
    message: dict[str, Any]  # the assistant's reply as the client sees it (content, tool_calls)
    finish_reason: str
    usage: Usage
    timing: Timing
    token_ids: list[int]
    prompt_token_ids: list[int]
    session: SessionSnapshot
    # The reply's content split by the reasoning parser (None without one; `message` keeps it whole).
    parts: Optional[ReplyParts] = None


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
    pages_swap_reused: int = 0      # pages a swap-out did not copy: the copy kept since their swap-in was valid
    swap_copies_released: int = 0   # resident sessions' kept copies given up for another session's swap-out
    swap_in_finishes_forced: int = 0  # swap-ins written into their pages before their copy was seen to arrive


# --- sessions and turns -------------------------------------------------------------------------------
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
    # Extra chat-template variables every turn renders with (vLLM's chat_template_kwargs, e.g. Qwen3's
    # {"enable_thinking": false}); fixed for the session's life, as its tools are.
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    messages: list[dict[str, Any]] = field(default_factory=list)
    # The session's own replies as clients see them, by their index in `messages`, where they differ from
    # the history: with a reasoning parser, the thinking apart as reasoning_content (the history keeps the
    # model's text whole, markers and all, since the template must re-render it as generated).
    shown_replies: dict[int, dict[str, Any]] = field(default_factory=dict)
    token_ids: list[int] = field(default_factory=list)
    text: str = ""  # what token_ids decode to (template sessions)
    state: SessionState = SessionState.NEW
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0  # leading tokens whose KV is in block_table (or in swap when SWAPPED)
    # Of those, the leading tokens whose draft-model KV is there too (speculative decoding: a turn's draft
    # computes only past them). Read clamped to num_computed, which every path that drops pages lowers.
    num_draft_computed: int = 0
    # CPU swap slots of pages [swap_from:] (SWAPPED), or of some of its full pages kept since a swap-in
    # (RESIDENT: sessions/swap_copies.py); swap_from: leading pages left to the prefix cache when swapped out.
    swap_slots: list[int] = field(default_factory=list)
    swap_from: int = 0
    busy: Optional["PendingTurn"] = None
    restoring: Optional["Restore"] = None  # a swap in whose copy is in flight (RESIDENT, pages not yet written)
    closed: bool = False
    num_turns: int = 0
    created_at: float = field(default_factory=time.time)
    last_active: float = field(default_factory=time.monotonic)
    last_active_wall: float = field(default_factory=time.time)
    expected_by: Optional[float] = None  # monotonic deadline from the expected_next_turn_ms hint
    tenant: str = ANONYMOUS_TENANT  # the owner: other tenants cannot see or touch the session
    # The adapter's id + load generation when the session was made: its pages hash under it, so a
    # reload of the adapter's name never finds this session's KV (nor this session the new load's).
    lora_key: Optional[LoRAKey] = None
    # Kept by the Responses API for a stored response's continuations, not opened by a client: idle, it
    # holds no adapter in use (unloading or replacing the adapter is not refused over it; a continuation
    # names its model again and cannot reach weights that are gone: it starts a new session or is a 404).
    stored_response: bool = False

    def mark_active(self, now: float) -> None:
        """A turn or a fork restarts the TTL, on both clocks: `now` (monotonic) the one expiry reads, the wall
        one SessionInfo's last_active_at / expires_at show."""
        self.last_active, self.last_active_wall = now, time.time()

    @property
    def extra_key(self) -> Optional[tuple[Optional[LoRAKey], Optional[str]]]:
        # Mirrors kv_cache_manager.extra_key_of for the session's requests.
        if self.lora_key is None and self.cache_salt is None:
            return None
        return (self.lora_key, self.cache_salt)


@dataclass(frozen=True)
class Restore:
    """A swap in whose copy is in flight (sessions/residency.py): the copy is named `ticket`, goes into
    `blocks` when finished, and only then are the restored full pages `hashes[first_hashed:]`
    registered in the prefix cache (before, another request could find them and read nothing)."""
    ticket: int
    blocks: tuple[int, ...]
    hashes: tuple[bytes, ...]  # the pages' prefix-cache digests
    first_hashed: int


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
    history_index: Optional[int] = None  # the reply's index in session.messages (set when committed)
    result_message: Optional[dict[str, Any]] = None
    snapshot: Optional[SessionSnapshot] = None
    task: Optional["asyncio.Task[None]"] = None
    loop: Optional[asyncio.AbstractEventLoop] = None  # the loop running `task`
    ended: Optional[asyncio.Event] = None
    end_ran: bool = False  # TurnLifecycle._end_turn has run (it may be reached twice: see settle_ended_turn)


def snapshot_of(s: Session, include_messages: bool = False, include_token_ids: bool = False) -> SessionSnapshot:
    """What a client sees of a session (step thread: the session must not change meanwhile)."""
    kv = s.num_computed if s.state in (SessionState.RESIDENT, SessionState.SWAPPED) else 0
    return SessionSnapshot(
        session_id=s.session_id, model=s.model, adapter=s.adapter, state=s.state, num_tokens=len(s.token_ids),
        num_kv_tokens=kv, num_pages=len(s.block_table),
        num_swapped_pages=len(s.swap_slots) if s.state is SessionState.SWAPPED else 0,
        num_turns=s.num_turns, num_messages=len(s.messages), busy=s.busy is not None, parent_id=s.parent_id,
        created_at=s.created_at, last_active_at=s.last_active_wall, expires_at=s.last_active_wall + s.ttl,
        ttl_seconds=s.ttl, metadata=dict(s.metadata), raw_tokens=s.raw_tokens,
        messages=[dict(s.shown_replies.get(i, m)) for i, m in enumerate(s.messages)] if include_messages else None,
        token_ids=list(s.token_ids) if include_token_ids else None, template_kwargs=dict(s.template_kwargs))
