"""Counters the engine keeps for the servers to export (Prometheus, Health, SessionInfo)."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field


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
    _window: deque = field(default_factory=lambda: deque(maxlen=256))  # (time, generated tokens)
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

    def record_step(self, generated: int) -> None:
        self._window.append((time.monotonic(), generated))

    @property
    def generation_tokens_per_s(self) -> float:
        if len(self._window) < 2:
            return 0.0
        span = self._window[-1][0] - self._window[0][0]
        return sum(n for _, n in list(self._window)[1:]) / span if span > 0 else 0.0
