"""Validated engine configuration: one `EngineConfig` built from Python keyword arguments or CLI flags."""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

DType = Literal["auto", "float32", "float16", "bfloat16"]


class _Strict(BaseModel):
    # Unknown keys are errors: a typo in a config option must not be silently ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    model: str = Field(description="Path of a local Hugging Face model directory, or a named shape with load_format='dummy'.")
    tokenizer: Optional[str] = Field(default=None, description="Tokenizer directory; defaults to the model directory.")
    dtype: DType = "auto"
    load_format: Literal["auto", "safetensors", "dummy"] = "auto"
    max_model_len: Optional[int] = Field(default=None, gt=0)
    seed: int = 0
    served_model_name: Optional[str] = None


class CacheConfig(_Strict):
    block_size: int = Field(default=16, gt=0)
    num_blocks: Optional[int] = Field(default=None, gt=0, description="Fixes the number of KV pages; overrides memory-based sizing.")
    gpu_memory_utilization: float = Field(default=0.9, gt=0.0, le=1.0)
    cpu_kv_cache_gb: float = Field(default=1.0, gt=0.0)
    swap_space_gb: float = Field(default=1.0, ge=0.0, description="CPU swap space for evicted session pages.")
    enable_prefix_caching: bool = True


class SchedulerConfig(_Strict):
    max_num_batched_tokens: int = Field(default=2048, gt=0)
    max_num_seqs: int = Field(default=256, gt=0)
    policy: Literal["fcfs", "priority"] = "fcfs"
    max_waiting: int = Field(default=4096, gt=0, description="Queue bound; past it requests are refused.")
    decode_reserve_tokens: int = Field(
        default=256, ge=0,
        description="Admission counts pages for a request's whole prompt plus this many generated tokens (fewer "
                    "if max_tokens is lower) as taken, so that admitting it does not later force running requests "
                    "to be preempted and recomputed.")
    async_scheduling: Optional[bool] = Field(
        default=None, description="Schedule and prepare step N+1 on the CPU while the device runs step N "
        "(vLLM V1's async scheduling). None: on for CUDA, off elsewhere.")


class LoRAConfig(_Strict):
    enable_lora: bool = False
    max_loras: int = Field(default=4, gt=0)
    max_lora_rank: int = Field(default=64, gt=0)
    max_cpu_loras: int = Field(default=32, gt=0)


class SpecConfig(_Strict):
    draft_model: Optional[str] = None
    num_speculative_tokens: int = Field(default=4, gt=0)


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    grpc_port: Optional[int] = None
    http_port: Optional[int] = None
    api_key: Optional[Union[str, list[str]]] = Field(
        default=None, description="API key clients must send (repeat the flag for several; each is its own tenant). "
        "Without any key, every client is one anonymous tenant.")
    api_key_file: Optional[str] = Field(
        default=None, description="File of API keys, one 'key[:tenant]' a line ('#' starts a comment); keys "
        "naming the same tenant share its sessions and prefix cache.")
    max_sessions: int = Field(default=8192, gt=0, description="Open sessions on the server, all tenants together.")
    max_sessions_per_tenant: int = Field(default=1024, gt=0, description="Open sessions one tenant may hold.")
    max_requests_per_tenant: int = Field(
        default=1024, gt=0, description="Generation requests (turns, completions, streams) one tenant may have "
        "queued or running; past it requests get RESOURCE_EXHAUSTED / HTTP 429.")
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


class EngineConfig(_Strict):
    model: ModelConfig
    cache: CacheConfig = CacheConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    lora: LoRAConfig = LoRAConfig()
    spec: SpecConfig = SpecConfig()
    server: ServerConfig = ServerConfig()
    device: Optional[str] = Field(default=None, description="'cuda', 'cpu' or None for CUDA when available.")
    attention_backend: Literal["auto", "torch", "triton"] = "auto"
    enforce_eager: bool = False
    grammar_backend: str = "auto"

    @model_validator(mode="after")
    def _check(self) -> "EngineConfig":
        if self.scheduler.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")
        return self

    @classmethod
    def from_kwargs(cls, model: str, **kwargs: object) -> "EngineConfig":
        """Builds the nested config from flat keyword arguments (vLLM style: LLM(model, max_num_seqs=8))."""
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
        return cls(
            model=ModelConfig(**sections["model"]), cache=CacheConfig(**sections["cache"]),
            scheduler=SchedulerConfig(**sections["scheduler"]), lora=LoRAConfig(**sections["lora"]),
            spec=SpecConfig(**sections["spec"]), server=ServerConfig(**sections["server"]), **top,
        )
