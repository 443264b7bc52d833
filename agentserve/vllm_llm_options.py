"""vLLM's LLM(...) keywords that have no agentserve option, so that code written for vLLM's offline API
runs here unchanged when it passes them at their defaults (LLM(model, tokenizer_mode="auto",
revision=None, download_dir=None) is common boilerplate). A keyword that asks for something agentserve
does not do (a hub revision, CPU offload, a pooling runner, torch.compile levels) is an error that
names it and says what to do instead; one whose behaviour agentserve always has is accepted.
`agentserve serve` takes the same names as `vllm serve` flags (agentserve/vllm_serve_only_flags.py).
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

_LOCAL_ONLY = "agentserve loads local model directories (no model hub): put that revision of the model in a directory"

# name -> (the values accepted: vLLM's default and what means the same here, why any other is refused)
AT_DEFAULT: dict[str, tuple[tuple[Any, ...], str]] = {
    "tokenizer_mode": (("auto", "hf"), "the model directory's tokenizer is loaded with transformers' AutoTokenizer "
                       "(vLLM's 'auto'); other tokenizer modes are not supported"),
    "revision": ((None,), _LOCAL_ONLY),
    "tokenizer_revision": ((None,), _LOCAL_ONLY),
    "code_revision": ((None,), _LOCAL_ONLY),
    "download_dir": ((None,), _LOCAL_ONLY),
    "hf_token": ((None, False), _LOCAL_ONLY),
    "hf_overrides": ((None, {}), "config overrides are not supported: edit config.json in the model directory"),
    "rope_scaling": ((None, {}), "config overrides are not supported: edit config.json in the model directory"),
    "rope_theta": ((None,), "config overrides are not supported: edit config.json in the model directory"),
    "cpu_offload_gb": ((0, 0.0), "weights are never offloaded to the CPU: use fp8 quantization or more devices "
                       "(tensor_parallel_size) for a model that does not fit"),
    "kv_cache_memory_bytes": ((None,), "the KV pool is sized by gpu_memory_utilization"),
    "compilation_config": ((None, 0, {}), "the model is not torch.compiled (decode steps replay CUDA graphs; "
                           "enforce_eager=True turns those off)"),
    "logits_processors": ((None, []), "custom logits processors are not supported (sampling parameters, "
                          "logit_bias, allowed_token_ids, bad_words and output constraints are)"),
    "runner": (("auto", "generate"), "agentserve serves generative models only"),
    "convert": (("auto", "none"), "agentserve serves generative models only"),
    "pooler_config": ((None,), "agentserve serves generative models only"),
    "override_pooler_config": ((None,), "agentserve serves generative models only"),
    "allowed_local_media_path": (("",), "agentserve serves text-only models"),
    "allowed_media_domains": ((None,), "agentserve serves text-only models"),
    "mm_processor_kwargs": ((None, {}), "agentserve serves text-only models"),
    "pipeline_parallel_size": ((1,), "pipeline parallelism is not supported: use tensor_parallel_size"),
    "data_parallel_size": ((1,), "data parallelism is not supported: run one engine per device group"),
    "distributed_executor_backend": ((None, "mp"), "tensor-parallel ranks are local processes ('mp'); ray is not "
                                     "supported"),
    "enable_expert_parallel": ((False,), "mixture-of-experts models are not supported"),
    "enable_sleep_mode": ((False,), "sleep mode is not supported: close the engine to free the device"),
    "enable_prompt_embeds": ((False,), "prompts are token ids or text; prompt embeddings are not supported"),
    "model_impl": (("auto",), "agentserve runs its own implementation of each supported architecture"),
    "override_generation_config": ((None, {}), "use generation_config (a directory holding a "
                                   "generation_config.json) or the request's sampling parameters"),
    "fully_sharded_loras": ((False,), "LoRA adapters are split with their layers; fully sharded LoRA is not "
                            "supported"),
    "lora_dtype": (("auto", None), "adapters are served in the model's dtype"),
    "task": ((None, "auto", "generate"), "agentserve serves generative models only"),
    "skip_tokenizer_init": ((False,), "the tokenizer is needed for chat templates, stop strings and detokenizing"),
    "config_format": (("auto", "hf"), "the model directory's config.json is read (Hugging Face format)"),
    "hf_config_path": ((None,), "the model directory's config.json is read: put the config there"),
    "quantization_param_path": ((None,), "fp8 KV scales are measured at startup (calculate_kv_scales)"),
    "model_loader_extra_config": ((None, {}), "checkpoints are read by one built-in loader with no options"),
    "pt_load_map_location": (("cpu",), "PyTorch .bin checkpoints are read onto the CPU, then moved"),
    "ignore_patterns": ((None, [], "original/**/*", ["original/**/*"]), "only the model directory's top-level "
                        "weight files are read (vLLM's default 'original/**/*' is always so)"),
    "speculative_model": ((None,), "pass speculative_config={'model': path, 'num_speculative_tokens': k} "
                          "(vLLM's current form) or draft_model=path"),
    "num_scheduler_steps": ((1,), "multi-step scheduling is not supported (vLLM V1 dropped it as well): async "
                            "scheduling overlaps the host's work with the device's"),
    "num_lookahead_slots": ((0,), "speculation reserves its own slots from num_speculative_tokens"),
    "multi_step_stream_outputs": ((True,), "multi-step scheduling is not supported: every step streams its tokens"),
    "preemption_mode": ((None, "recompute"), "a preempted request recomputes its tokens (only sessions swap)"),
    "max_num_partial_prefills": ((1,), "concurrent partial prefills are not supported"),
    "max_long_partial_prefills": ((1,), "concurrent partial prefills are not supported"),
    "num_gpu_blocks_override": ((None,), "pass num_blocks, agentserve's option for the KV pool's page count"),
    "stream_interval": ((1,), "streams carry each step's tokens as it ends"),
    "logprobs_mode": (("raw_logprobs",), "logprobs are the model's raw log-softmax, before temperature, penalties "
                      "and other sampling parameters (vLLM's 'raw_logprobs')"),
    "prefix_caching_hash_algo": (("sha256", "sha256_cbor"), "prefix-cache keys are SHA-256 digests of the parent "
                                 "key, the adapter / salt and the page's token ids (vLLM's default); Python's "
                                 "built-in hash collides (CVE-2025-25183) and xxhash is not offered"),
    "cuda_graph_sizes": ((None, [], [512], 512), "decode graphs are captured for batch sizes 1, 2, 4 and multiples of "
                         "8 up to min(max_num_seqs, 512); larger steps run eagerly (enforce_eager=True: none)"),
    "kv_transfer_config": ((None,), "disaggregated prefill (KV transfer) is not supported"),
    "kv_events_config": ((None,), "KV cache events are not published"),
    "kv_sharing_fast_prefill": ((False,), "cross-layer KV sharing is not supported"),
    "scheduler_cls": ((None, "vllm.core.scheduler.Scheduler", "vllm.v1.core.sched.scheduler.Scheduler"),
                      "the scheduler is agentserve's own and cannot be replaced"),
    "worker_cls": (("auto",), "the model runner is agentserve's own and cannot be replaced"),
    "worker_extension_cls": (("",), "the model runner is agentserve's own and cannot be extended"),
    "ray_workers_use_nsight": ((False,), "ray is not supported"),
    "enable_lora_bias": ((False,), "LoRA adapters with bias terms are refused when loaded"),
    "long_lora_scaling_factors": ((None,), "long-context LoRA (scaled rotary per adapter) is not supported"),
    "default_mm_loras": ((None, {}), "agentserve serves text-only models"),
    "limit_mm_per_prompt": ((None, {}), "agentserve serves text-only models"),
    "media_io_kwargs": ((None, {}), "agentserve serves text-only models"),
    "mm_encoder_tp_mode": (("weights", "data"), "agentserve serves text-only models"),
    "enable_mm_embeds": ((False,), "agentserve serves text-only models"),
    "interleave_mm_strings": ((False,), "agentserve serves text-only models"),
    "skip_mm_profiling": ((False,), "agentserve serves text-only models"),
    "otlp_traces_endpoint": ((None,), "OpenTelemetry tracing is not supported: /metrics serves Prometheus metrics"),
    "collect_detailed_traces": ((None,), "OpenTelemetry tracing is not supported"),
    "show_hidden_metrics_for_version": ((None,), "no deprecated metrics are kept to show"),
    "enable_log_requests": ((False,), "requests are not logged one by one: /metrics counts them"),
    "logits_processor_pattern": ((None,), "logits processors are not loaded by name: requests take logit_bias, "
                                 "bad_words and allowed_token_ids"),
    "override_attention_dtype": ((None,), "attention runs in the model's dtype with fp32 accumulation"),
    "io_processor_plugin": ((None,), "no IO processor plugins: prompts are text or token ids"),
    "safetensors_load_strategy": ((None, "lazy"), "safetensors files are memory-mapped and read tensor by tensor "
                                  "(vLLM's 'lazy')"),
    "additional_config": ((None, {}), "there is no platform-specific configuration"),
    "scheduler_delay_factor": ((0, 0.0), "waiting requests are admitted at every step (no delay factor)"),
    "decode_context_parallel_size": ((1,), "decode context parallelism is not supported: use tensor_parallel_size"),
    "enable_dbo": ((False,), "dual-batch overlap (a mixture-of-experts feature) is not supported"),
    "gdn_prefill_backend": ((None,), "Gated DeltaNet models are not supported"),
    "mamba_cache_dtype": (("auto",), "agentserve serves attention models (no Mamba state)"),
    "mamba_ssm_cache_dtype": (("auto",), "agentserve serves attention models (no Mamba state)"),
    **{name: (defaults, "data parallelism is not supported: run one engine per device group") for name, defaults in (
        ("data_parallel_rank", (None,)), ("data_parallel_size_local", (None, 1)), ("data_parallel_address", (None,)),
        ("data_parallel_rpc_port", (None,)), ("data_parallel_backend", ("mp",)), ("data_parallel_hybrid_lb", (False,)),
        ("data_parallel_external_lb", (False,)), ("data_parallel_start_rank", (None, 0)))},
    **{name: (defaults, "mixture-of-experts models are not supported") for name, defaults in (
        ("enable_eplb", (False,)), ("eplb_config", (None, {})), ("expert_placement_strategy", ("linear",)),
        ("num_redundant_experts", (0,)))},
}

# Options agentserve has whose vLLM default is None, meaning "the engine's own choice" (EngineArgs'
# block_size, enable_prefix_caching, max_num_seqs, max_num_batched_tokens, max_cpu_loras; LLM's seed):
# None leaves agentserve's default, as it leaves vLLM's.
NONE_IS_DEFAULT = frozenset(("block_size", "enable_prefix_caching", "max_num_seqs", "max_num_batched_tokens",
                             "max_cpu_loras", "seed", "num_speculative_tokens"))

# name -> why any value is accepted: what it controls is always so here, or has no counterpart.
ANY_VALUE: dict[str, str] = {
    "max_seq_len_to_capture": "decode CUDA graphs serve every sequence length",
    "disable_custom_all_reduce": "tensor parallelism all-reduces through torch.distributed (no custom kernel)",
    "disable_async_output_proc": "outputs are processed while the next step runs (async scheduling)",
    "max_parallel_loading_workers": "checkpoint shards load one after the other",
    "calculate_kv_scales": "fp8 KV scales are always measured at startup",
    "disable_sliding_window": "a model's sliding window always caps max_model_len (full attention within it)",
    "use_v2_block_manager": "KV pages are always managed by one paged block pool (vLLM deprecated the flag)",
    "disable_cascade_attn": "cascade attention is not used (shared prefixes share pages)",
    "disable_hybrid_kv_cache_manager": "one KV pool serves every layer (no hybrid-attention models)",
    "use_tqdm_on_load": "checkpoint loading shows no progress bar",
    "lora_extra_vocab_size": "adapters that add tokens are refused, so no extra vocabulary is reserved",
    "mm_processor_cache_gb": "agentserve serves text-only models (no multimodal processor cache)",
    "disable_mm_preprocessor_cache": "agentserve serves text-only models (no multimodal processor cache)",
    "disable_chunked_mm_input": "agentserve serves text-only models",
    "enable_multimodal_encoder_data_parallel": "agentserve serves text-only models",
    "enable_reasoning": "the reasoning is split from the reply whenever a reasoning parser is given (vLLM dropped "
                        "the flag)",
    "aggregate_engine_logging": "one engine per server: its statistics are on /metrics",
    "fail_on_environ_validation": "no environment variables are validated at start-up",
}
# Those of ANY_VALUE that `vllm serve` takes as switches (no value follows the flag).
ANY_VALUE_SWITCHES = frozenset(("disable_custom_all_reduce", "disable_async_output_proc", "calculate_kv_scales",
                                "disable_sliding_window", "use_v2_block_manager", "disable_cascade_attn",
                                "disable_hybrid_kv_cache_manager", "use_tqdm_on_load", "disable_mm_preprocessor_cache",
                                "disable_chunked_mm_input", "enable_multimodal_encoder_data_parallel", "enable_reasoning",
                                "aggregate_engine_logging", "fail_on_environ_validation"))


def check_at_default(name: str, value: Any, table: dict[str, tuple[tuple[Any, ...], str]]) -> None:
    """ValueError naming `name` unless `value` is one of those its table entry accepts (1 is not True there)."""
    accepted, why = table[name]
    if not any(value == ok and type(value) is type(ok) or value is ok for ok in accepted):
        raise ValueError(f"{name}={value!r} is not supported: {why} (accepted: {', '.join(repr(ok) for ok in accepted)})")


def take_vllm_only_llm_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """`kwargs` without vLLM's LLM keywords listed above; raises ValueError naming a keyword whose value
    asks for what agentserve does not do."""
    kept: dict[str, Any] = {}
    for name, value in kwargs.items():
        if name in AT_DEFAULT:
            check_at_default(name, value, AT_DEFAULT)
        elif name in NONE_IS_DEFAULT and value is None:
            continue
        elif name in ANY_VALUE:
            logger.info("%s=%r accepted: %s", name, value, ANY_VALUE[name])
        else:
            kept[name] = value
    return kept
