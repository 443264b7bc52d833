"""vLLM's LLM(...) keywords without an agentserve option (agentserve/vllm_llm_options.py): at their defaults
they are accepted (vLLM code's boilerplate runs unchanged), any other value is a ValueError naming the
keyword and what to do; structured_outputs_config / guided_decoding_backend choose the grammar backend."""

from __future__ import annotations

from typing import Any

import pytest

from agentserve import SamplingParams
from agentserve.llm import LLM
from agentserve.testing import tiny_model_cached
from agentserve.vllm_flags import engine_kwargs_from_vllm_llm_kwargs

VLLM_DEFAULTS: dict[str, Any] = dict(
    tokenizer_mode="auto", revision=None, tokenizer_revision=None, code_revision=None, download_dir=None,
    hf_token=None, hf_overrides=None, cpu_offload_gb=0, compilation_config=None, logits_processors=None,
    runner="auto", convert="auto", pooler_config=None, allowed_local_media_path="", mm_processor_kwargs=None,
    pipeline_parallel_size=1, data_parallel_size=1, enable_sleep_mode=False, kv_cache_memory_bytes=None,
    max_seq_len_to_capture=8192, disable_custom_all_reduce=False, disable_async_output_proc=False,
    structured_outputs_config={"backend": "xgrammar"},
    # EngineArgs of vLLM 0.8-0.11 at their defaults (the twenty-seventh session found these refused as unknown).
    num_scheduler_steps=1, num_lookahead_slots=0, multi_step_stream_outputs=True, use_v2_block_manager=True,
    preemption_mode=None, long_prefill_token_threshold=0, max_num_partial_prefills=1, max_long_partial_prefills=1,
    num_gpu_blocks_override=None, stream_interval=1, logprobs_mode="raw_logprobs", cuda_graph_sizes=[],
    kv_transfer_config=None, kv_events_config=None, kv_sharing_fast_prefill=False, worker_cls="auto",
    worker_extension_cls="", scheduler_cls="vllm.core.scheduler.Scheduler", ignore_patterns=["original/**/*"],
    pt_load_map_location="cpu", model_loader_extra_config=None, hf_config_path=None, quantization_param_path=None,
    speculative_model=None, num_speculative_tokens=None, enable_lora_bias=False, long_lora_scaling_factors=None,
    lora_extra_vocab_size=256, limit_mm_per_prompt={}, mm_encoder_tp_mode="weights", media_io_kwargs={},
    skip_mm_profiling=False, disable_cascade_attn=False, disable_hybrid_kv_cache_manager=False,
    use_tqdm_on_load=True, enable_log_requests=False, otlp_traces_endpoint=None, collect_detailed_traces=None,
    show_hidden_metrics_for_version=None, ray_workers_use_nsight=False, prefix_caching_hash_algo="sha256")


def test_vllm_boilerplate_at_defaults_builds_an_engine_that_generates() -> None:
    llm = LLM(str(tiny_model_cached("llama")), device="cpu", max_model_len=128, **VLLM_DEFAULTS)
    assert llm.engine.config.grammar_backend == "xgrammar"
    out = llm.generate("hello", SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == 3


@pytest.mark.parametrize("name,value,says", [
    ("revision", "main", "local model directories"),
    ("download_dir", "/tmp/hub", "no model hub"),
    ("tokenizer_mode", "mistral", "AutoTokenizer"),
    ("cpu_offload_gb", 4, "never offloaded"),
    ("runner", "pooling", "generative models only"),
    ("compilation_config", 3, "torch.compiled"),
    ("pipeline_parallel_size", 2, "tensor_parallel_size"),
    ("hf_overrides", {"rope_theta": 1e6}, "config.json"),
    ("num_scheduler_steps", 8, "multi-step scheduling"),
    ("num_gpu_blocks_override", 100, "num_blocks"),
    ("logprobs_mode", "processed_logprobs", "raw log-softmax"),
    ("speculative_model", "/models/draft", "speculative_config"),
    ("kv_transfer_config", {"kv_connector": "LMCacheConnectorV1"}, "disaggregated prefill"),
    ("prefix_caching_hash_algo", "builtin", "SHA-256 digests"),
    ("enable_log_requests", True, "not logged"),
    ("ignore_patterns", ["*.pt"], "top-level weight files"),
])
def test_a_value_agentserve_does_not_do_is_refused_by_name(name: str, value: Any, says: str) -> None:
    with pytest.raises(ValueError, match=f"^{name}=") as err:
        engine_kwargs_from_vllm_llm_kwargs({name: value})
    assert says in str(err.value)


def test_the_structured_outputs_backend_maps_onto_grammar_backend() -> None:
    assert engine_kwargs_from_vllm_llm_kwargs({"guided_decoding_backend": "guidance"}) == {"grammar_backend": "llguidance"}
    assert engine_kwargs_from_vllm_llm_kwargs({"structured_outputs_config": {"backend": "outlines"}}) == {
        "grammar_backend": "outlines"}
    with pytest.raises(ValueError, match="'lm-format-enforcer' is not one of"):
        engine_kwargs_from_vllm_llm_kwargs({"structured_outputs_config": {"backend": "lm-format-enforcer"}})
    with pytest.raises(ValueError, match="only {'backend': name}"):
        engine_kwargs_from_vllm_llm_kwargs({"structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True}})
    with pytest.raises(ValueError, match="disagree"):
        engine_kwargs_from_vllm_llm_kwargs({"guided_decoding_backend": "xgrammar", "grammar_backend": "outlines"})


def test_unknown_keywords_still_fail_in_the_engine_config() -> None:
    kept = engine_kwargs_from_vllm_llm_kwargs({"max_num_seqs": 4, "no_such_option": 1})
    assert kept == {"max_num_seqs": 4, "no_such_option": 1}
    with pytest.raises(ValueError, match="unknown engine option 'no_such_option'"):
        LLM(str(tiny_model_cached("llama")), device="cpu", no_such_option=1)


# EngineArgs' defaults (vllm/engine/arg_utils.py) for options agentserve has too: None there is "the engine's
# own choice", so it leaves agentserve's; and LLM's seed=None, task, skip_tokenizer_init, config_format.
VLLM_NONE_DEFAULTS: dict[str, Any] = dict(
    block_size=None, enable_prefix_caching=None, max_num_seqs=None, max_num_batched_tokens=None, max_cpu_loras=None,
    seed=None, task="auto", skip_tokenizer_init=False, config_format="auto")


def test_vllm_engine_args_none_defaults_leave_agentserves_defaults() -> None:
    llm = LLM(str(tiny_model_cached("llama")), device="cpu", max_model_len=128, **VLLM_NONE_DEFAULTS)
    plain = LLM(str(tiny_model_cached("llama")), device="cpu", max_model_len=128)
    assert llm.engine.config == plain.engine.config
    out = llm.generate("hello", SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == 3
    assert engine_kwargs_from_vllm_llm_kwargs({"block_size": 32, "seed": 7}) == {"block_size": 32, "seed": 7}
    with pytest.raises(ValueError, match="^skip_tokenizer_init=True"):
        engine_kwargs_from_vllm_llm_kwargs({"skip_tokenizer_init": True})
    llm.close()
    plain.close()


def test_quantization_and_kv_cache_dtype_take_the_clis_values() -> None:
    """LLM(quantization="gguf") on a GGUF (and a checkpoint's own compressed-tensors / fbgemm_fp8) is taken as
    `agentserve serve --quantization` takes it (pydantic's "Input should be 'fp8'" before); the values agentserve
    cannot serve are a ValueError naming the keyword and why."""
    from agentserve.testing.real import smollm2_gguf_path
    with LLM(str(smollm2_gguf_path()), quantization="gguf", num_blocks=32, max_model_len=128) as gguf:
        assert gguf.engine.config.model.quantization is None  # the file's tensors, dequantized at load
    for kw, says in (({"quantization": "compressed-tensors"}, "quantization='compressed-tensors'.*says none"),
                     ({"quantization": "awq"}, "quantization='awq': agentserve cannot serve"),
                     ({"kv_cache_dtype": "fp8_e5m2"}, "kv_cache_dtype='fp8_e5m2' is not supported: .*e4m3")):
        with pytest.raises(ValueError, match=says):
            LLM(str(tiny_model_cached("qwen2")), num_blocks=16, **kw)
