"""Validated engine configuration: one `EngineConfig` built from Python keyword arguments or CLI flags."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from agentserve.http_frontend_config import HttpFrontendConfig
from agentserve.speculative_config import merge_speculative_config

DType = Literal["auto", "float32", "float16", "bfloat16"]
# vLLM's other names for the same dtypes (`vllm serve --dtype half` is common in its docs).
DTYPE_ALIASES = {"half": "float16", "float": "float32"}


class _Strict(BaseModel):
    # Unknown keys are errors: a typo in a config option must not be silently ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    model: str = Field(description="Path of a local Hugging Face model directory or GGUF file (or a directory "
                       "holding one), or a named shape with load_format='dummy'.")
    tokenizer: Optional[str] = Field(default=None, description="Tokenizer directory; defaults to the model directory.")
    dtype: DType = Field(default="auto", description="Weight and activation dtype; 'auto': the checkpoint's on "
                         "CUDA (bfloat16 for a float32 one, as vLLM), float32 on CPU.")
    load_format: Literal["auto", "safetensors", "dummy"] = Field(
        default="auto", description="'auto' reads the directory's *.safetensors, or its PyTorch .bin files where it "
        "has none (vLLM's fallback); 'safetensors' reads safetensors only; 'dummy' builds random weights for the "
        "model's config (benchmarks).")
    max_model_len: Optional[int] = Field(default=None, gt=0, description="Longest prompt plus output, in tokens; "
                                         "defaults to the model's max_position_embeddings.")
    # At most int64's: the draft model's stream is seeded a fixed offset above it, within torch's uint64 seeds.
    seed: int = Field(default=0, ge=0, le=2**63 - 1, description="Random seed (vLLM's): of the sampling of requests that give no seed "
                      "of their own (the same requests in the same order sample the same tokens after a restart), "
                      "and of the random weights of load_format=dummy.")
    max_logprobs: int = Field(
        default=20, ge=-1, description="Most logprobs (and top_logprobs, prompt_logprobs) a request may ask for "
        "(vLLM's flag; -1: no cap but the vocabulary size); past it the request is refused.")
    quantization: Optional[Literal["fp8"]] = Field(
        default=None, description="'fp8': serve the linear layers with e4m3 weights (a 16-bit checkpoint is "
        "quantized at load, per output channel). FP8 checkpoints (compressed-tensors, fine-grained fp8) are read "
        "as their quantization_config says, with or without this flag.")
    chat_template: Optional[str] = Field(
        default=None, description="A chat template (Jinja) replacing the tokenizer's: a file path, or the template "
        "itself (vLLM's --chat-template).")
    generation_config: str = Field(
        default="auto", description="Where default sampling parameters come from when a request leaves them unset "
        "(vLLM's flag): 'auto' reads the model's generation_config.json (temperature, top_p, top_k, min_p, "
        "repetition_penalty), 'vllm' uses none (temperature 1.0 etc.), or a directory holding a "
        "generation_config.json.")
    served_model_name: Optional[Union[str, list[str]]] = Field(
        default=None, description="Name(s) clients use in the `model` field (vLLM's flag; give several to accept "
        "several). The first is the one /v1/models and ListModels report. Default: the model directory's base "
        "name; the model path as given is always accepted too.")

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype_alias(cls, value: object) -> object:
        return DTYPE_ALIASES.get(value, value) if isinstance(value, str) else value

    def served_model_names(self) -> list[str]:
        """The names the APIs report, first the main one. The default is the directory's base name: a
        path's '/' reads as a provider prefix to agent frameworks (the OpenAI Agents SDK refuses it)."""
        if isinstance(self.served_model_name, str):
            return [self.served_model_name]
        if self.served_model_name:
            return list(self.served_model_name)
        # abspath, not resolve(): a symlinked model directory keeps the name it was given.
        return [Path(os.path.abspath(self.model)).name or self.model]

    def accepted_model_names(self) -> frozenset[str]:
        """Every name a request's `model` may use for the base model: the served names and the path as given."""
        return frozenset([*self.served_model_names(), self.model])


class CacheConfig(_Strict):
    block_size: int = Field(default=16, gt=0, description="Tokens per KV page.")
    num_blocks: Optional[int] = Field(default=None, gt=0, description="Fixes the number of KV pages; overrides memory-based sizing.")
    gpu_memory_utilization: float = Field(default=0.9, gt=0.0, le=1.0, description="Share of the GPU's memory the "
                                          "engine may use (weights, activations and KV pages).")
    cpu_kv_cache_gb: float = Field(default=1.0, gt=0.0, description="KV cache size on CPU, in GiB.")
    swap_space_gb: float = Field(default=1.0, ge=0.0, description="CPU swap space for evicted session pages.")
    enable_prefix_caching: bool = Field(default=True, description="Reuse the KV pages of a cached prompt prefix.")
    kv_cache_dtype: Literal["auto", "fp8", "fp8_e4m3"] = Field(
        default="auto", description="KV page dtype: 'auto' (the model dtype) or 'fp8' (e4m3 with per-layer scales: "
        "twice the tokens in the same memory).")


class SchedulerConfig(_Strict):
    # Unset, both follow the device (engine/batch_defaults.py): 8192 and 1024 on GPUs of >= 70 GiB but A100s.
    max_num_batched_tokens: int = Field(default=2048, gt=0, description="Token budget of one engine step "
                                        "(prefill chunks plus decodes). Default: 8192 on GPUs of >= 70 GiB other "
                                        "than the A100, else 2048.")
    max_num_seqs: int = Field(default=256, gt=0, description="Most requests running at once. Default: 1024 on GPUs "
                              "of >= 70 GiB other than the A100, else 256.")
    policy: Literal["fcfs", "priority"] = Field(
        default="fcfs", description="Admission order: 'fcfs', or 'priority' (lower priority values first).")
    max_waiting: int = Field(default=4096, gt=0, description="Queue bound in sequences (a request counts its prompts "
                             "x n, as vLLM V1 fans n out); past it requests are refused.")
    long_prefill_token_threshold: int = Field(
        default=0, ge=0, description="Most tokens one request computes in a step (vLLM's: a long prompt is prefilled "
        "in chunks of this size, leaving the rest of each step's budget to other prompts); 0: no cap beyond "
        "max_num_batched_tokens.")
    decode_reserve_tokens: int = Field(
        default=256, ge=0,
        description="Admission counts pages for a request's whole prompt plus this many generated tokens (fewer "
                    "if max_tokens is lower) as taken, so that admitting it does not later force running requests "
                    "to be preempted and recomputed.")
    async_scheduling: Optional[bool] = Field(
        default=None, description="Schedule and prepare step N+1 on the CPU while the device runs step N "
        "(vLLM V1's async scheduling). None: on for CUDA, off elsewhere.")

    @model_validator(mode="before")
    @classmethod
    def _budget_covers_the_sequences(cls, values: object) -> object:
        """vLLM's rule: every running sequence needs a token of the step's budget, so max_num_seqs above
        max_num_batched_tokens is refused; left unset, max_num_seqs follows a smaller budget."""
        if not isinstance(values, dict) or not isinstance(values.get("max_num_batched_tokens"), int):
            return values
        budget, seqs = values["max_num_batched_tokens"], values.get("max_num_seqs")
        if isinstance(seqs, int) and 0 < budget < seqs:
            raise ValueError(f"max_num_batched_tokens ({budget}) must be greater than or equal to max_num_seqs "
                             f"({seqs}): every running sequence takes a token of the step's budget")
        if seqs is None and 0 < budget < cls.model_fields["max_num_seqs"].default:
            return {**values, "max_num_seqs": budget}
        return values


DEFAULT_LORA_SLOT_WAIT_S = 30.0  # LoRAConfig.lora_slot_wait_s (the scheduler's default too)


class LoRAConfig(_Strict):
    enable_lora: bool = Field(default=False, description="Serve LoRA adapters (LoadAdapter, `model` naming one).")
    max_loras: int = Field(default=4, gt=0, description="LoRA adapters resident on the device at once.")
    max_lora_rank: int = Field(default=64, gt=0, description="Largest LoRA rank accepted.")
    max_cpu_loras: int = Field(default=32, gt=0, description="LoRA adapters kept in CPU memory (at least "
                               "max_loras; the least recently used beyond it are read again from their directory).")
    lora_target_modules: Optional[list[str]] = Field(
        default=None, description="The modules adapters may target (of q_proj k_proj v_proj o_proj gate_proj "
        "up_proj down_proj; SGLang's flag): projections outside them run no LoRA kernels and hold no slots. "
        "Default: all seven.")
    lora_modules: dict[str, str] = Field(default_factory=dict, description="Adapters loaded at start: name -> PEFT "
                                         "directory (vLLM's --lora-modules name=path).")
    lora_slot_wait_s: float = Field(
        default=DEFAULT_LORA_SLOT_WAIT_S, ge=0, description="How long a request may wait for a LoRA slot while the resident adapters keep "
        "taking new requests; past it they take none until it has a slot (they drain). Bounds the wait of an adapter "
        "behind a steady stream to others; 0 holds them back at once (fair, but smaller batches).")

    @model_validator(mode="after")
    def _check_lora(self) -> "LoRAConfig":
        known = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        bad = [m for m in self.lora_target_modules or [] if m not in known]
        if bad or self.lora_target_modules == []:
            raise ValueError(f"lora_target_modules: {bad or 'an empty list'} is not allowed; choose from {', '.join(known)}")
        if self.lora_modules and not self.enable_lora:
            raise ValueError("lora_modules needs enable_lora (--enable-lora)")
        return self


# The n-gram proposer's default tail lengths (SpecConfig.prompt_lookup_min / _max).
_DEFAULT_LOOKUP_MIN = 2
_DEFAULT_LOOKUP_MAX = 5


class SpecConfig(_Strict):
    speculative_method: Optional[Literal["draft_model", "ngram"]] = Field(
        default=None, description="Speculative decoding: 'draft_model' (a smaller model with the target's vocabulary, "
        "--draft-model) or 'ngram' (prompt lookup in the request's own context, no model). Default: 'draft_model' "
        "when --draft-model is given, else off.")
    draft_model: Optional[str] = Field(default=None, description="Draft model directory for speculative decoding "
                                       "(or a named dummy shape such as 'llama-3.2-1b' with --load-format dummy).")
    draft_quantization: Optional[Literal["fp8"]] = Field(
        default=None, description="Quantize the draft model's weights at load ('fp8': e4m3, per output channel, "
        "its lm_head included: proposals are verified, and the head is a large share of a small draft's bytes), "
        "independently of --quantization (which applies to the target). A pre-quantized draft checkpoint is "
        "served in its own scheme without it.")
    num_speculative_tokens: int = Field(default=4, gt=0, le=16, description="Most tokens proposed per request "
                                        "and step (dynamic speculation may use fewer, down to 0).")
    prompt_lookup_min: int = Field(default=_DEFAULT_LOOKUP_MIN, gt=0, description="N-gram proposer: shortest context "
                                   "tail matched (given alone above the default maximum, the maximum follows it).")
    prompt_lookup_max: int = Field(default=_DEFAULT_LOOKUP_MAX, gt=0, description="N-gram proposer: longest context "
                                   "tail matched (given alone below the default minimum, the minimum follows it).")
    spec_dynamic: bool = Field(default=True, description="Choose k per step from the batch size and the measured "
                               "acceptance rate (down to 0 at large batch); off: always num_speculative_tokens.")
    spec_device_continuation: bool = Field(
        default=True, description="Queue each draft proposal on the device right behind the verification it "
        "continues from (from its accepted tokens, before the host reads them), so the host's processing of a "
        "speculative step overlaps the draft's forwards; off: propose once the host has the verified tokens.")
    spec_synthetic_acceptance: Optional[float] = Field(
        default=None, ge=0.0, le=1.0, description="Benchmarks only: accept each draft token with this probability "
        "whatever its value (measures the system's cost at a chosen acceptance on random weights; outputs are not "
        "the target's).")

    @model_validator(mode="before")
    @classmethod
    def _read_counts(cls, values: object) -> object:
        """Counts given as booleans are refused (pydantic would read True as 1). A prompt-lookup bound
        given alone that contradicts the other's default carries the other with it, as vLLM's
        speculative_config does (prompt_lookup_min=8 alone means 8..8, not an error about a max of
        5 that nobody set)."""
        if not isinstance(values, dict):
            return values
        for name in ("num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max"):
            if isinstance(values.get(name), bool):
                raise ValueError(f"{name} must be an integer, got {values[name]!r}")
        low, high = values.get("prompt_lookup_min"), values.get("prompt_lookup_max")
        if (low is None) != (high is None):
            values = dict(values)
            try:
                if low is not None and int(low) > _DEFAULT_LOOKUP_MAX:
                    values["prompt_lookup_max"] = low
                elif high is not None and 0 < int(high) < _DEFAULT_LOOKUP_MIN:
                    values["prompt_lookup_min"] = high
            except (TypeError, ValueError):
                pass  # not a number: the field's own validation names it
        return values

    @property
    def method(self) -> Optional[str]:
        """The proposer in use, or None when speculation is off."""
        if self.speculative_method is not None:
            return self.speculative_method
        return "draft_model" if self.draft_model is not None else None

    @model_validator(mode="after")
    def _check(self) -> "SpecConfig":
        if self.speculative_method == "draft_model" and self.draft_model is None:
            raise ValueError("speculative_method='draft_model' needs draft_model (--draft-model PATH)")
        if self.speculative_method == "ngram" and self.draft_model is not None:
            raise ValueError("speculative_method='ngram' takes no draft_model; drop one of them")
        if self.draft_quantization is not None and self.draft_model is None:
            raise ValueError("draft_quantization applies to a draft model: give draft_model (--draft-model PATH) "
                             "or drop draft_quantization")
        if self.prompt_lookup_max < self.prompt_lookup_min:
            raise ValueError(f"prompt_lookup_max ({self.prompt_lookup_max}) must be >= prompt_lookup_min "
                             f"({self.prompt_lookup_min})")
        return self


class ServerConfig(HttpFrontendConfig):  # the HTTP server's TLS, CORS, logging: http_frontend_config.py
    host: str = Field(default="127.0.0.1", description="Address the servers listen on (0.0.0.0 for all).")
    grpc_port: Optional[int] = Field(default=None, ge=0, le=65535,
                                     description="Port of the gRPC AgentService (0: a free port).")
    http_port: Optional[int] = Field(default=None, ge=0, le=65535,
                                     description="Port of the OpenAI-compatible HTTP API (0: a free port).")
    api_key: Optional[Union[str, list[str]]] = Field(
        default=None, description="API key clients must send (repeat the flag for several; each is its own tenant). "
        "Without any key, every client is one anonymous tenant.")
    api_key_file: Optional[str] = Field(
        default=None, description="File of API keys, one 'key[:tenant]' a line ('#' starts a comment); keys "
        "naming the same tenant share its sessions and prefix cache.")
    max_sessions: int = Field(default=8192, gt=0, description="Open sessions on the server, all tenants together.")
    max_sessions_per_tenant: int = Field(default=1024, gt=0, description="Open sessions one tenant may hold.")
    max_conversation_bytes_per_tenant: int = Field(
        default=2**30, gt=0, description="Bytes (as JSON) of the Conversations API's items one tenant may keep in "
        "host memory, over all its conversations; past it adding items or responses to them gets HTTP 429.")
    max_requests_per_tenant: int = Field(
        default=1024, gt=0, description="Generation requests (turns, completions, streams) one tenant may have "
        "queued or running; past it requests get RESOURCE_EXHAUSTED / HTTP 429. Applies once API keys are set "
        "(without keys only the engine's queue bounds requests).")
    # Per-request limits (HTTP, gRPC and the offline API where they apply). Each refuses a request
    # before it costs work that grows with its size; the defaults are generous for real agent traffic.
    max_body_bytes: int = Field(
        default=32 * 2**20, gt=0, description="Largest HTTP request body in bytes, counted on the bytes actually read "
        "(chunked bodies too); past it the answer is 413.")
    grpc_max_message_bytes: int = Field(
        default=32 * 2**20, gt=0, description="Largest gRPC request message in bytes; past it RESOURCE_EXHAUSTED.")
    max_messages: int = Field(default=4096, gt=0, description="Most messages in one request (chat, session, turn).")
    max_tools: int = Field(default=256, gt=0, description="Most tools declared in one request or session.")
    max_schema_bytes: int = Field(
        default=2**20, gt=0, description="Largest JSON schema (response format, guided_json, a tool's parameters), "
        "in bytes of its JSON text.")
    max_schema_depth: int = Field(default=64, gt=0, description="Deepest nesting of objects and arrays in a JSON schema.")
    max_stop_strings: int = Field(default=64, gt=0, description="Most stop strings in one request.")
    max_stop_string_chars: int = Field(default=1024, gt=0, description="Longest stop string, in characters.")
    max_bad_words: int = Field(default=64, gt=0, description="Most bad_words in one request.")
    max_bad_word_chars: int = Field(default=1024, gt=0, description="Longest bad word, in characters.")
    prompt_bytes_per_token: int = Field(
        default=32, gt=0, description="Cheap length bound checked before tokenizing: text longer than max_model_len "
        "times this many characters cannot fit and is refused without tokenizing it.")
    tokenizer_workers: int = Field(
        default=4, gt=0, description="Threads that render chat templates and tokenize prompts (shared by HTTP and "
        "gRPC), so that the engine's step thread only sees token ids and a small request does not wait behind a "
        "large one.")
    trust_request_chat_template: bool = Field(
        default=False, description="Accept a chat template sent in a request (chat_template or "
        "chat_template_kwargs.chat_template); off, such requests get 400. vLLM's flag of the same name.")
    response_role: str = Field(
        default="assistant", min_length=1, description="The role of chat completion replies (message.role, a "
        "stream's first delta.role) after a generation prompt; without one (add_generation_prompt false) a reply "
        "continues the last message in its role. vLLM's flag of the same name.")
    enable_request_id_headers: bool = Field(
        default=False, description="Answer every HTTP request with an X-Request-Id header: the request's own, else "
        "a fresh id. vLLM's flag of the same name. A request's X-Request-Id names its completion (the response's "
        "id) with or without it.")
    return_tokens_as_token_ids: bool = Field(
        default=False, description="Name the tokens in logprobs as 'token_id:{id}' rather than their text (for "
        "tokens that do not decode to text alone); a request's return_tokens_as_token_ids overrides it. vLLM's "
        "flag of the same name.")


class EngineConfig(_Strict):
    model: ModelConfig
    cache: CacheConfig = CacheConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    lora: LoRAConfig = LoRAConfig()
    spec: SpecConfig = SpecConfig()
    server: ServerConfig = ServerConfig()
    device: Optional[str] = Field(default=None, description="'cuda' or 'cpu' (default: CUDA when available).")
    attention_backend: Literal["auto", "torch", "triton"] = Field(
        default="auto", description="Attention kernels: 'triton', the 'torch' reference, or 'auto' (Triton on CUDA).")
    enforce_eager: bool = Field(default=False, description="Never capture CUDA graphs.")
    tensor_parallel_size: int = Field(
        default=1, ge=1, description="Ranks (GPUs, or CPU processes over gloo) one model is split over, the Megatron "
        "way (vLLM's flag). Its heads and MLP width must divide by it. Rank 0 schedules and samples; the others "
        "run their shard of each step; LoRA adapters and FP8 scales are split with their layers.")
    grammar_backend: str = Field(default="auto", description="Constrained decoding backend: llguidance, outlines, "
                                 "xgrammar or 'auto' (llguidance).")
    reasoning_parser: Optional[str] = Field(
        default=None, description="vLLM's reasoning parser for models that think first: 'qwen3' or 'deepseek_r1' "
        "(<think> ... </think>), 'mistral' (Magistral: [THINK] ... [/THINK]). Chat replies carry the reasoning as "
        "reasoning_content, and output constraints (schemas, tool calls) apply after it.")

    @model_validator(mode="after")
    def _check(self) -> "EngineConfig":
        if self.scheduler.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")
        return self

    @classmethod
    def from_kwargs(cls, model: str, **kwargs: object) -> "EngineConfig":
        """Builds the nested config from flat keyword arguments (vLLM style: LLM(model, max_num_seqs=8)),
        vLLM's `speculative_config` dict among them (agentserve/speculative_config.py)."""
        kwargs = merge_speculative_config(kwargs)
        sections: dict[str, dict[str, object]] = {name: {} for name in ("model", "cache", "scheduler", "lora", "spec", "server")}
        section_of = {
            name: section
            for section, cfg_cls in (
                ("model", ModelConfig), ("cache", CacheConfig), ("scheduler", SchedulerConfig),
                ("lora", LoRAConfig), ("spec", SpecConfig), ("server", ServerConfig),
            )
            for name in cfg_cls.model_fields
        }
        top: dict[str, object] = {}
        for key, value in kwargs.items():
            if key in cls.model_fields and key not in section_of:
                top[key] = value
            elif key in section_of:
                sections[section_of[key]][key] = value
            else:
                raise ValueError(f"unknown engine option {key!r}")
        sections["model"]["model"] = model
        # model_validate: the sections are checked by pydantic exactly as keyword construction would.
        return cls.model_validate(dict(
            top, model=ModelConfig.model_validate(sections["model"]), cache=CacheConfig.model_validate(sections["cache"]),
            scheduler=SchedulerConfig.model_validate(sections["scheduler"]), lora=LoRAConfig.model_validate(sections["lora"]),
            spec=SpecConfig.model_validate(sections["spec"]), server=ServerConfig.model_validate(sections["server"]),
        ))
