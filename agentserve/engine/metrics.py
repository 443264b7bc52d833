"""Counters the engine keeps for the servers to export (Prometheus, Health, SessionInfo)."""

from __future__ import annotations

import operator
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Optional

from agentserve.cache.block_pool import BlockPool
from agentserve.request import Request

RATE_WINDOW_S = 10.0  # generation_tokens_per_s averages over this much of the recent past
_computed_of = operator.attrgetter("num_computed_tokens")
_table_of = operator.attrgetter("block_table")


@dataclass
class EngineMetrics:
    num_running: int = 0
    num_waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    prefix_cache_queries: int = 0  # tokens looked up
    prefix_cache_hits: int = 0     # tokens found
    prompt_tokens_total: int = 0   # prompt tokens of admitted requests
    prefilled_tokens_total: int = 0  # prompt-side tokens actually computed (recomputes included)
    generation_tokens_total: int = 0
    num_preemptions_total: int = 0
    requests_finished_total: int = 0
    # Used token slots over allocated token slots, accumulated per step (KV memory efficiency).
    kv_slots_held: int = 0
    kv_slots_allocated: int = 0
    # Speculative decoding (vLLM's spec_decode counters): rows that verified drafts, draft tokens
    # proposed, accepted, and accepted per draft position (index j: drafts accepted at position j).
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_num_rejected_rows: int = 0  # rows that stopped at a rejected draft (not all accepted)
    spec_num_continued_proposals: int = 0  # proposals adopted from the device (spec/continuation.py)
    spec_accepted_per_position: list = field(default_factory=list)
    _window: deque = field(default_factory=deque)  # (time, generated tokens) of the last RATE_WINDOW_S
    _first_step: float = 0.0
    # Tokens each step computed (vLLM's iteration_tokens_total), kept only while an exporter drains them.
    iteration_tokens: Optional[deque] = None
    # Callables run on the step thread with each sequence that finishes (stop or length), e.g. the
    # Prometheus exporter's latency histograms. They must be cheap and must not raise.
    finish_hooks: list = field(default_factory=list)

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0

    @property
    def kv_memory_efficiency(self) -> float:
        return self.kv_slots_held / self.kv_slots_allocated if self.kv_slots_allocated else 1.0

    def record_spec_row(self, num_draft: int, num_accepted: int) -> None:
        """One verification row: num_draft tokens proposed, the first num_accepted accepted."""
        if not num_draft:
            return
        self.spec_num_drafts += 1
        self.spec_num_draft_tokens += num_draft
        self.spec_num_accepted_tokens += num_accepted
        self.spec_num_rejected_rows += num_accepted < num_draft
        grow = num_draft - len(self.spec_accepted_per_position)
        if grow > 0:
            self.spec_accepted_per_position.extend([0] * grow)
        for j in range(num_accepted):
            self.spec_accepted_per_position[j] += 1

    @property
    def spec_acceptance_rate(self) -> float:
        """Accepted draft tokens over proposed ones."""
        return self.spec_num_accepted_tokens / self.spec_num_draft_tokens if self.spec_num_draft_tokens else 0.0

    @property
    def spec_mean_accepted_length(self) -> float:
        """Tokens a verification row emits on average: accepted drafts plus the one the target adds."""
        return 1.0 + self.spec_num_accepted_tokens / self.spec_num_drafts if self.spec_num_drafts else 0.0

    def record_step(self, generated: int) -> None:
        now = time.monotonic()
        window = self._window
        if not self._first_step:
            self._first_step = now
        window.append((now, generated))
        while window[0][0] < now - RATE_WINDOW_S:
            window.popleft()

    def update_after_step(self, running: list[Request], num_waiting: int, pool: BlockPool,
                          num_preempted: int, num_sampled: int, num_scheduled_tokens: int = 0) -> None:
        """The gauges and counters after one engine step."""
        if self.iteration_tokens is not None and num_scheduled_tokens:
            self.iteration_tokens.append(num_scheduled_tokens)
        self.num_running = len(running)
        self.num_waiting = num_waiting
        self.kv_blocks_used = pool.num_used_blocks
        self.prefix_cache_queries = pool.query_tokens
        self.prefix_cache_hits = pool.hit_tokens
        self.num_preemptions_total += num_preempted
        self.record_step(num_sampled)
        # KV memory efficiency: tokens held in pages over the slots of the pages they own.
        self.kv_slots_held += sum(map(_computed_of, running))
        self.kv_slots_allocated += sum(map(len, map(_table_of, running))) * pool.block_size

    @property
    def generation_tokens_per_s(self) -> float:
        """Tokens generated over the last RATE_WINDOW_S (less since the first step), as of now: an idle
        engine's rate falls to 0 (read from any thread: the step thread only appends and pops)."""
        now = time.monotonic()
        span = min(RATE_WINDOW_S, now - self._first_step) if self._first_step else 0.0
        recent = sum(n for t, n in list(self._window) if t >= now - RATE_WINDOW_S)
        return recent / span if span > 0 else 0.0


@dataclass(frozen=True)
class EngineGauges:
    """Engine state as of now (not as of the last step): what /metrics and gRPC Health report."""
    num_running: int
    num_waiting: int
    kv_pages_used: int
    kv_pages_total: int
    prefix_cache_queries: int
    prefix_cache_hits: int

    @property
    def kv_usage(self) -> float:
        return self.kv_pages_used / self.kv_pages_total if self.kv_pages_total else 0.0

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0


def live_engine_gauges(engine: Any) -> EngineGauges:
    """Reads the scheduler's queues and the page pool directly, from any thread: EngineMetrics is
    only refreshed when the engine steps, so after the last request finishes it would report that
    request as still running until the next step, which an idle server never takes. Each value is one
    len() or int read of state the step thread owns (atomic under the GIL); together they are not one
    snapshot, which gauges do not need. `engine` is an Engine (Any: engine.py imports this module)."""
    scheduler, pool = engine.scheduler, engine.pool
    # n > 1: the siblings of a leader whose prompt is not in yet wait outside the scheduler (vLLM counts n requests).
    unforked = sum(map(len, list(engine.pending_forks.values())))
    return EngineGauges(num_running=scheduler.num_running, num_waiting=scheduler.num_waiting + unforked,
                        kv_pages_used=pool.num_used_blocks, kv_pages_total=pool.num_blocks,
                        prefix_cache_queries=pool.query_tokens, prefix_cache_hits=pool.hit_tokens)
