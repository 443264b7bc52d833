"""vLLM's metric names on /metrics: the series a vLLM deployment's dashboards and alerts read
(`vllm:num_requests_running`, `vllm:kv_cache_usage_perc`, `vllm:time_to_first_token_seconds`, ...,
labelled with `model_name` as vLLM labels them), mirroring agentserve's own series at scrape time: the
same values under a second name, so nothing is counted twice and nothing can drift apart.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

# agentserve's series (without the agentserve_ prefix) -> vLLM's names for it. vLLM renamed a few
# over releases (gpu_cache_usage_perc -> kv_cache_usage_perc, time_per_output_token_seconds ->
# inter_token_latency_seconds): both names are served.
VLLM_NAMES: dict[str, tuple[str, ...]] = {
    "num_requests_running": ("num_requests_running",),
    "num_requests_waiting": ("num_requests_waiting",),
    "kv_cache_usage_ratio": ("kv_cache_usage_perc", "gpu_cache_usage_perc"),  # vLLM's "perc" is 0..1 too
    "prefix_cache_queries_tokens": ("prefix_cache_queries",),
    "prefix_cache_hits_tokens": ("prefix_cache_hits",),
    "prompt_tokens": ("prompt_tokens",),
    "generation_tokens": ("generation_tokens",),
    "num_preemptions": ("num_preemptions",),
    "request_success": ("request_success",),
    "time_to_first_token_seconds": ("time_to_first_token_seconds",),
    "inter_token_latency_seconds": ("inter_token_latency_seconds", "time_per_output_token_seconds"),
    "e2e_request_latency_seconds": ("e2e_request_latency_seconds",),
    "request_queue_time_seconds": ("request_queue_time_seconds",),
    "request_prompt_tokens": ("request_prompt_tokens",),
    "request_generation_tokens": ("request_generation_tokens",),
    "spec_decode_num_drafts": ("spec_decode_num_drafts",),
    "spec_decode_num_draft_tokens": ("spec_decode_num_draft_tokens",),
    "spec_decode_num_accepted_tokens": ("spec_decode_num_accepted_tokens",),
    "spec_decode_num_accepted_tokens_per_pos": ("spec_decode_num_accepted_tokens_per_pos",),
    "lora_requests_info": ("lora_requests_info",),
    "cache_config_info": ("cache_config_info",),
    "request_prefill_time_seconds": ("request_prefill_time_seconds",),
    "request_decode_time_seconds": ("request_decode_time_seconds",),
    "request_inference_time_seconds": ("request_inference_time_seconds",),
    "request_params_max_tokens": ("request_params_max_tokens",),
    "request_params_n": ("request_params_n",),
    "request_max_num_generation_tokens": ("request_max_num_generation_tokens",),
    "iteration_tokens_total": ("iteration_tokens_total",),
}


class VLLMNamesCollector(Collector):
    """Re-exports the families of `sources` (collectors of agentserve's series, named `prefix` + a key
    of VLLM_NAMES) under `vllm:` names with a `model_name` label."""

    def __init__(self, sources: Sequence[Any], prefix: str, model_name: str) -> None:
        self.sources = sources
        self.prefix = prefix
        self.model_name = model_name

    def collect(self) -> Iterable[Metric]:
        for source in self.sources:
            for family in source.collect():
                key = family.name[len(self.prefix):] if family.name.startswith(self.prefix) else None
                for vllm_name in VLLM_NAMES.get(key or "", ()):
                    yield self._renamed(family, "vllm:" + vllm_name)

    def _renamed(self, family: Metric, name: str) -> Metric:
        out = Metric(name, family.documentation + " (vLLM's name)", family.type)
        for sample in family.samples:
            suffix = sample.name[len(family.name):]  # _total, _bucket, _sum, _count, _created, or nothing
            out.add_sample(name + suffix, {"model_name": self.model_name, **sample.labels}, sample.value,
                           sample.timestamp)
        return out
