"""The per-request histograms of `/metrics` that vLLM's dashboards read besides latency: each finished sequence's
prefill, decode and inference intervals and its max_tokens; each finished request's n and its largest output
(vLLM's request_max_num_generation_tokens over a request's n sequences); and tokens per engine step.

Fed by `Metrics.drain` (adapters/openai/metrics.py) from the timings the engine's finish hook queued, on the event
loop, never on the step thread."""

from __future__ import annotations

from typing import Optional

from prometheus_client import CollectorRegistry, Histogram

_N_BUCKETS = (1, 2, 5, 10, 20)  # vLLM's request_params_n buckets
_ITERATION_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


def _one_two_five(limit: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to `limit` (vLLM's build_1_2_5_buckets)."""
    out: list[int] = []
    scale = 1
    while True:
        for m in (1, 2, 5):
            if m * scale > limit:
                return tuple(out)
            out.append(m * scale)
        scale *= 10


class RequestHistograms:
    def __init__(self, registry: CollectorRegistry, prefix: str, latency_buckets: tuple[float, ...],
                 max_model_len: int) -> None:
        """`prefix` and `latency_buckets`: the exporter's, so these series sit beside its latency histograms."""
        r = registry
        tokens = _one_two_five(max(max_model_len, 1))
        self.prefill = Histogram(prefix + "request_prefill_time_seconds",
                                 "Time from first scheduled to the first generated token (the prefill phase).",
                                 buckets=latency_buckets, registry=r)
        self.decode = Histogram(prefix + "request_decode_time_seconds",
                                "Time from the first generated token to the last (the decode phase).",
                                buckets=latency_buckets, registry=r)
        self.inference = Histogram(prefix + "request_inference_time_seconds",
                                   "Time from first scheduled to the last generated token (prefill and decode).",
                                   buckets=latency_buckets, registry=r)
        self.max_tokens = Histogram(prefix + "request_params_max_tokens", "The max_tokens of each finished sequence.",
                                    buckets=tokens, registry=r)
        self.n = Histogram(prefix + "request_params_n", "The n of each finished request.", buckets=_N_BUCKETS,
                           registry=r)
        self.max_generation = Histogram(prefix + "request_max_num_generation_tokens",
                                        "Each finished request's largest output over its n sequences, in tokens.",
                                        buckets=tokens, registry=r)
        self.iteration = Histogram(prefix + "iteration_tokens_total", "Tokens each engine step computed.",
                                   buckets=_ITERATION_BUCKETS, registry=r)

    @property
    def all(self) -> list[Histogram]:
        return [self.prefill, self.decode, self.inference, self.max_tokens, self.n, self.max_generation, self.iteration]

    def observe(self, scheduled: Optional[float], first: Optional[float], last: Optional[float],
                max_tokens: Optional[int], n: int, group_max: Optional[int]) -> None:
        """One finished sequence; `group_max` is set on its request's last one."""
        if scheduled is not None and first is not None:
            self.prefill.observe(max(0.0, first - scheduled))
            if last is not None:
                self.inference.observe(max(0.0, last - scheduled))
        if first is not None and last is not None:
            self.decode.observe(max(0.0, last - first))
        if max_tokens is not None:
            self.max_tokens.observe(max_tokens)
        if group_max is not None:
            self.n.observe(n)
            self.max_generation.observe(group_max)
