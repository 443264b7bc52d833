"""Prometheus metrics for `/metrics` (prometheus_client text format, one registry per app).

Two sources:
- Engine-wide state and counters (running / waiting requests, KV pages, prefix-cache hits, token
  totals, preemptions) are read at scrape time by a custom collector, so they cover every request in
  the process (HTTP and gRPC alike). The gauges (running, waiting, pages) come from the scheduler and
  the page pool themselves (`live_engine_gauges`), not from EngineMetrics, which is only refreshed
  when the engine steps: an idle server must report 0 running and its pages free.
- Per-request latency histograms (time to first token, inter-token latency, end-to-end latency,
  queue time) are fed from the engine's finish hook (`EngineMetrics.finish_hooks`), which hands
  each finished sequence's timing to us on the step thread. The hook only appends a tuple to a
  deque; the observations happen on the event loop (a background drain, and before every scrape),
  so the step loop pays next to nothing.
- Sessions resident / swapped / evicted come from the session store when one is given
  (`SessionStore.residency_counts()`, safe from any thread).
"""

from __future__ import annotations

import collections
import time
from typing import TYPE_CHECKING, Any, Iterable, Optional

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from agentserve.adapters.openai.request_histograms import RequestHistograms
from agentserve.adapters.openai.vllm_metrics import VLLMNamesCollector
from agentserve.engine.metrics import EngineMetrics, live_engine_gauges

if TYPE_CHECKING:
    from agentserve.engine.engine import Engine
    from agentserve.sessions.store import SessionStore

PREFIX = "agentserve_"

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0, 160.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
                0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


def _spec_decode_metrics(m: EngineMetrics) -> Iterable[Any]:
    """Speculative decoding, with vLLM's spec_decode names: drafts verified, draft tokens proposed and
    accepted (in all and per draft position), acceptance rate and mean accepted length."""
    yield CounterMetricFamily(PREFIX + "spec_decode_num_drafts", "Rows that verified draft tokens.",
                              value=m.spec_num_drafts)
    yield CounterMetricFamily(PREFIX + "spec_decode_num_draft_tokens", "Draft tokens proposed and verified.",
                              value=m.spec_num_draft_tokens)
    yield CounterMetricFamily(PREFIX + "spec_decode_num_accepted_tokens", "Draft tokens accepted.",
                              value=m.spec_num_accepted_tokens)
    per_position = CounterMetricFamily(PREFIX + "spec_decode_num_accepted_tokens_per_pos",
                                       "Draft tokens accepted at each draft position (0 = the first).",
                                       labels=["position"])
    for position, accepted in enumerate(m.spec_accepted_per_position):
        per_position.add_metric([str(position)], accepted)
    yield per_position
    yield CounterMetricFamily(PREFIX + "spec_decode_num_continued_proposals",
                              "Proposals queued on the device behind their verification and adopted.",
                              value=m.spec_num_continued_proposals)
    yield GaugeMetricFamily(PREFIX + "spec_decode_acceptance_rate", "Accepted draft tokens over proposed ones.",
                            value=m.spec_acceptance_rate)
    yield GaugeMetricFamily(PREFIX + "spec_decode_mean_accepted_length",
                            "Tokens a verification row emits on average (accepted drafts + 1).",
                            value=m.spec_mean_accepted_length)


class _EngineCollector(Collector):
    def __init__(self, engine: Engine, session_store: Optional[SessionStore]) -> None:
        self.engine = engine
        self.session_store = session_store

    def collect(self) -> Iterable[Any]:
        m = self.engine.metrics

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(PREFIX + name, doc, value=value)

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(PREFIX + name, doc, value=value)

        live = live_engine_gauges(self.engine)
        yield gauge("num_requests_running", "Sequences in the running batch.", live.num_running)
        yield gauge("num_requests_waiting", "Sequences waiting to be scheduled.", live.num_waiting)
        yield gauge("kv_cache_pages_used", "KV cache pages (blocks) in use.", live.kv_pages_used)
        yield gauge("kv_cache_pages_total", "KV cache pages (blocks) in the pool.", live.kv_pages_total)
        yield gauge("kv_cache_usage_ratio", "Share of KV cache pages in use (0..1).", live.kv_usage)
        yield gauge("prefix_cache_hit_rate", "Prompt tokens found in the prefix cache over tokens looked up.",
                    live.prefix_cache_hit_rate)
        yield counter("prefix_cache_queries_tokens", "Prompt tokens looked up in the prefix cache.",
                      live.prefix_cache_queries)
        yield counter("prefix_cache_hits_tokens", "Prompt tokens found in the prefix cache.", live.prefix_cache_hits)
        yield counter("prompt_tokens", "Prompt tokens of admitted requests.", m.prompt_tokens_total)
        yield counter("prefilled_tokens", "Prompt-side tokens actually computed (cache misses, recomputes).",
                      m.prefilled_tokens_total)
        yield counter("generation_tokens", "Generated tokens.", m.generation_tokens_total)
        yield counter("num_preemptions", "Sequences preempted for lack of KV pages.", m.num_preemptions_total)
        yield counter("requests_finished", "Sequences that finished (stop or length).", m.requests_finished_total)
        yield gauge("generation_tokens_per_second", "Generation throughput over the last 10 s.",
                    m.generation_tokens_per_s)
        cache = self.engine.config.cache  # vLLM's cache_config_info: the settings as labels, the value 1
        info = GaugeMetricFamily(PREFIX + "cache_config_info", "The KV cache's configuration.",
                                 labels=["block_size", "num_gpu_blocks", "cache_dtype", "enable_prefix_caching",
                                         "gpu_memory_utilization", "swap_space"])
        info.add_metric([str(cache.block_size), str(self.engine.pool.num_blocks), cache.kv_cache_dtype,
                         str(cache.enable_prefix_caching), str(cache.gpu_memory_utilization),
                         str(cache.swap_space_gb)], 1)
        yield info
        yield from _spec_decode_metrics(m)
        lora = self.engine.lora_manager
        if lora is not None:  # only on a server started with --enable-lora
            yield gauge("lora_adapters_loaded", "LoRA adapters requests may name.", len(lora.names()))
            yield gauge("lora_max_loras", "LoRA adapters resident on the device at once (max_loras).", lora.max_loras)
            yield counter("lora_slot_loads", "LoRA adapters copied into a device slot.", lora.num_slot_loads)
            yield counter("lora_disk_reads", "LoRA adapters read from their directory (loads, CPU-tier misses).",
                          lora.num_disk_reads)
            running, waiting = self.engine.lora.adapters_in_use()
            # vLLM's lora_requests_info: the adapters as labels, the scrape time as the value.
            info = GaugeMetricFamily(PREFIX + "lora_requests_info", "LoRA adapters of running and waiting requests.",
                                     labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"])
            info.add_metric([",".join(running), ",".join(waiting), str(lora.max_loras)], time.time())
            yield info
            yield gauge("lora_adapters_running", "Distinct LoRA adapters of running requests.", len(running))
            yield gauge("lora_adapters_waiting", "Distinct LoRA adapters only waiting requests use.", len(waiting))
        sessions = {"resident": 0, "swapped": 0, "evicted": 0}
        if self.session_store is not None:
            sessions = self.session_store.residency_counts()
        yield gauge("sessions_resident", "Open sessions whose KV pages are resident on the device.",
                    sessions["resident"])
        yield gauge("sessions_swapped", "Open sessions whose KV pages are swapped out to CPU memory.",
                    sessions["swapped"])
        yield gauge("sessions_evicted", "Open sessions whose KV pages were dropped (recomputed on the next turn).",
                    sessions["evicted"])


class Metrics:
    """The app's registry: engine collector, latency histograms, HTTP request counters."""

    def __init__(self, engine: Engine, session_store: Optional[SessionStore] = None) -> None:
        self.engine = engine
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds",
                              "Time from arrival to the first generated token.", buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds",
                             "Time between consecutive output tokens (each sequence's decode time spread evenly "
                             "over its tokens: sum and count are exact).", buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Time from arrival to finish.",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.queue = Histogram(PREFIX + "request_queue_time_seconds",
                               "Time from arrival until first scheduled.", buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_len = Histogram(PREFIX + "request_prompt_tokens", "Prompt tokens per finished sequence.",
                                    buckets=_TOKEN_BUCKETS, registry=r)
        self.gen_len = Histogram(PREFIX + "request_generation_tokens", "Generated tokens per finished sequence.",
                                 buckets=_TOKEN_BUCKETS, registry=r)
        self.http_requests = Counter(PREFIX + "http_requests", "HTTP API requests by endpoint and status code.",
                                     ["endpoint", "status"], registry=r)
        self.finished = Counter(PREFIX + "request_success", "Finished requests (every API) by engine finish reason.",
                                ["finished_reason"], registry=r)
        self.per_request = RequestHistograms(r, PREFIX, _LATENCY_BUCKETS, engine.max_model_len)
        engine_collector = _EngineCollector(engine, session_store)
        r.register(engine_collector)
        # The same series under vLLM's names, for dashboards and alerts brought over from vLLM.
        r.register(VLLMNamesCollector([engine_collector, self.ttft, self.itl, self.e2e, self.queue, self.prompt_len,
                                       self.gen_len, self.finished, *self.per_request.all], PREFIX, engine.model_name))
        # Finished sequences' timings, appended on the step thread, observed on the event loop.
        self._pending: collections.deque = collections.deque(maxlen=1_000_000)
        self._hook_installed = False

    # --- engine hook ----------------------------------------------------------------------------------
    def install(self) -> None:
        if not self._hook_installed:
            self.engine.metrics.finish_hooks.append(self._on_finish)
            self.engine.metrics.iteration_tokens = collections.deque(maxlen=1_000_000)
            self._hook_installed = True

    def uninstall(self) -> None:
        if self._hook_installed:
            hooks = self.engine.metrics.finish_hooks
            if self._on_finish in hooks:  # an engine that closed may have dropped its hooks already
                hooks.remove(self._on_finish)
            self.engine.metrics.iteration_tokens = None
            self._hook_installed = False

    def _on_finish(self, req: Any, group_max: Optional[int]) -> None:
        # Step thread: keep it to one append.
        t, params = req.timing, req.sampling_params
        self._pending.append((t.arrival, t.first_scheduled, t.first_token, t.last_token, t.finished,
                              req.num_prompt_tokens, req.num_output_tokens, req.status.finish_reason,
                              params.max_tokens, params.n, group_max))

    def drain(self) -> None:
        steps = self.engine.metrics.iteration_tokens
        while steps:
            try:
                self.per_request.iteration.observe(steps.popleft())
            except IndexError:
                break
        pending = self._pending
        while pending:
            try:
                (arrival, scheduled, first, last, finished, n_prompt, n_out, reason, max_tokens, n,
                 group_max) = pending.popleft()
            except IndexError:
                break
            self.per_request.observe(scheduled, first, last, max_tokens, n, group_max)
            if scheduled is not None:
                self.queue.observe(max(0.0, scheduled - arrival))
            if first is not None:
                self.ttft.observe(max(0.0, first - arrival))
                if last is not None and n_out > 1:
                    mean = max(0.0, last - first) / (n_out - 1)
                    for _ in range(n_out - 1):
                        self.itl.observe(mean)
            if finished is not None:
                self.e2e.observe(max(0.0, finished - arrival))
            self.prompt_len.observe(n_prompt)
            self.gen_len.observe(n_out)
            if reason is not None:  # vLLM's labels: the engine's reasons (stop, length, abort), whatever the API
                self.finished.labels(reason).inc()

    def render(self) -> bytes:
        self.drain()
        return generate_latest(self.registry)


def parse_metrics(text: str) -> dict[str, float]:
    """Flat {sample name{labels}: value} view of a scrape (for tests and tools)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = s.name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items())) + "}" if s.labels else "")
            out[key] = s.value
    return out

