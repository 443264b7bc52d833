"""vLLM's LLM(...) keywords that have no agentserve option, so that code written for vLLM's offline API
runs here unchanged when it passes them at their defaults (LLM(model, tokenizer_mode="auto",
revision=None, download_dir=None) is common boilerplate). A keyword that asks for something agentserve
does not do (a hub revision, CPU offload, a pooling runner, torch.compile levels) is an error that
names it and says what to do instead; one whose behaviour agentserve always has is accepted.
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
}

# Options agentserve has whose vLLM default is None, meaning "the engine's own choice" (EngineArgs'
# block_size, enable_prefix_caching, max_num_seqs, max_num_batched_tokens, max_cpu_loras; LLM's seed):
# None leaves agentserve's default, as it leaves vLLM's.
NONE_IS_DEFAULT = frozenset(("block_size", "enable_prefix_caching", "max_num_seqs", "max_num_batched_tokens",
                             "max_cpu_loras", "seed"))

# name -> why any value is accepted: what it controls is always so here, or has no counterpart.
ANY_VALUE: dict[str, str] = {
    "max_seq_len_to_capture": "decode CUDA graphs serve every sequence length",
    "disable_custom_all_reduce": "tensor parallelism all-reduces through torch.distributed (no custom kernel)",
    "disable_async_output_proc": "outputs are processed while the next step runs (async scheduling)",
    "max_parallel_loading_workers": "checkpoint shards load one after the other",
    "calculate_kv_scales": "fp8 KV scales are always measured at startup",
    "disable_sliding_window": "a model's sliding window always caps max_model_len (full attention within it)",
}


def take_vllm_only_llm_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """`kwargs` without vLLM's LLM keywords listed above; raises ValueError naming a keyword whose value
    asks for what agentserve does not do."""
    kept: dict[str, Any] = {}
    for name, value in kwargs.items():
        if name in AT_DEFAULT:
            accepted, why = AT_DEFAULT[name]
            if not any(value == ok and type(value) is type(ok) or value is ok for ok in accepted):
                raise ValueError(f"{name}={value!r} is not supported: {why} (accepted: "
                                 f"{', '.join(repr(ok) for ok in accepted)})")
        elif name in NONE_IS_DEFAULT and value is None:
            continue
        elif name in ANY_VALUE:
            logger.info("%s=%r accepted: %s", name, value, ANY_VALUE[name])
        else:
            kept[name] = value
    return kept
