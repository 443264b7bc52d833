"""vLLM's offline LoRA handle, `LoRARequest(lora_name, lora_int_id, lora_path)`, for scripts moving over:
`llm.generate(prompts, params, lora_request=LoRARequest("sql", 1, "/adapters/sql"))` loads the adapter on
first use and serves it, as vLLM does. agentserve's own form is `llm.load_adapter(name, path)` and then
`adapter=name`; the adapter's name identifies it (`lora_int_id` is kept for the caller, not used)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str

    def __post_init__(self) -> None:
        if not self.lora_name:
            raise ValueError("LoRARequest.lora_name must be a non-empty adapter name")
        if self.lora_int_id < 1:
            raise ValueError(f"LoRARequest.lora_int_id must be >= 1 (as in vLLM), got {self.lora_int_id}")
        if not self.lora_path:
            raise ValueError("LoRARequest.lora_path must be the adapter's PEFT directory")
