"""PEFT adapters over the tiny models, and PEFT's own greedy tokens for them (each adapter merged into
the base weights with merge_and_unload): the reference every multi-LoRA engine test compares with."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

ALL_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_peft_adapter(base: Path, out: Path, *, seed: int = 0, scale: float = 1.0, **lora_kw: Any) -> Path:
    """Saves a PEFT LoRA over the model at `base` with random non-zero A and B (`scale` multiplies B,
    so tests can make adapters whose effect on greedy tokens is certain)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora_kw))
    if scale != 1.0:
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.mul_(scale)
    peft_model.save_pretrained(out)
    return out


def save_peft_variant(base: Path, out: Path, *, seed: int = 0, adapter_name: str = "default", safe: bool = True,
                      save_kwargs: Optional[dict[str, Any]] = None,
                      config_edit: Optional[dict[str, Any]] = None, **lora_kw: Any) -> Path:
    """Saves a PEFT LoRA over the model at `base` as PEFT writes it for `lora_kw` (init_lora_weights
    defaults to False), with random noise added to every lora_B so that even a zero-B initialisation
    changes outputs. `save_kwargs` go to save_pretrained; `config_edit` is then merged into the saved
    adapter_config.json (to mimic configs from other PEFT versions or tools). Returns the directory
    holding adapter_config.json (PEFT puts a non-default adapter name in a subdirectory)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    lora_kw.setdefault("init_lora_weights", False)
    peft_model = get_peft_model(model, LoraConfig(**lora_kw), adapter_name=adapter_name)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.add_(torch.randn_like(param))
    peft_model.save_pretrained(out, safe_serialization=safe, **(save_kwargs or {}))
    path = out if adapter_name == "default" else out / adapter_name
    if config_edit:
        cfg_path = path / "adapter_config.json"
        cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), **config_edit}))
    return path


@functools.lru_cache(maxsize=8)
def _merged(base: str, adapter: Optional[str]) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    if adapter is None:
        return model
    from peft import PeftModel

    return PeftModel.from_pretrained(model, adapter).merge_and_unload().eval()


def peft_greedy(base: Path, adapter: Optional[Path], prompts: Sequence[Sequence[int]], new_tokens: int) -> list[list[int]]:
    """Greedy continuations (no EOS stop) of the merged model, one full forward per token."""
    model = _merged(str(base), str(adapter) if adapter is not None else None)
    outs = []
    for prompt in prompts:
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(new_tokens):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        outs.append(ids[len(prompt):])
    return outs


def assert_graph_replays_match(step: Callable[[], None], slot_buf: torch.Tensor, max_loras: int, y: torch.Tensor,
                               reference: Callable[[torch.Tensor], torch.Tensor], **tol: Any) -> None:
    """Captures `step` (which writes y from the slot indices in the persistent `slot_buf`) in a CUDA
    graph, then replays it with new slot patterns (random, all base rows, one slot for every row):
    each replay must give reference(those slots)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile and warm up outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    m = slot_buf.numel()
    patterns = [torch.randint(-1, max_loras, (m,), dtype=torch.int32), torch.full((m,), -1, dtype=torch.int32),
                torch.full((m,), 3, dtype=torch.int32)]
    for pattern in patterns:
        slot_buf.copy_(pattern)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(y.float(), reference(slot_buf.clone()).float(), **tol)
