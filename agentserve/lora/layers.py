"""Multi-LoRA in the model's linear layers: each fused projection (qkv, o, gate_up, down) is wrapped
so that its output gets the LoRA delta of every token that has an adapter,

    y = base(x);  y[t] += scale_s * (x[t] @ A_s[slot_t]^T) @ B_s[slot_t]^T  for each slice s,

through kernels/lora.py's segmented shrink / expand (the torch reference on the CPU). The base
layer's weights are untouched (its quant_method applies them as before).

Where the slots come from: the runner sets ForwardMetadata.lora_slot_indices ([T] int32, -1 = base)
when some row of the step has an adapter, and leaves it None otherwise. A forward pre-hook on the
model turns it into the kernels' tile map once per forward (shared by every layer) and a post-hook
clears it. A base-only step therefore runs no LoRA kernel at all: the wrappers see no batch and
return the base output. The tile map is built with device ops only, so a decode CUDA graph captured
with a persistent slot-index buffer replays it for any slot assignment (worker/cuda_graph.py).

Tensor parallelism: the slots hold this rank's shard of each adapter (lora/tensor_parallel.py). A
column-parallel projection adds its columns of the delta to its output slice; a row-parallel one adds
its partial delta to its partial output, before the all-reduce that sums both over the ranks.

Speculation seam: a draft model is a separate CausalLM that is never wrapped, so it runs as the base
model; the target applies each request's adapter.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from agentserve.config import LoRAConfig
from agentserve.kernels.lora import LoRABatchMeta, add_lora, build_lora_batch_meta
from agentserve.lora.key import LoRAKey
from agentserve.lora.manager import FUSED_PROJECTIONS, LoRAStack, MultiLoRAManager
from agentserve.lora.tensor_parallel import LoRAShardLayout
from agentserve.model.arch_config import ArchConfig
from agentserve.model.attention import ForwardMetadata
from agentserve.model.linear import LinearBase, RowParallelLinear
from agentserve.model.llama import CausalLM


class LoRABatch:
    """The current forward's tile map (None: no token has an adapter), shared by all wrappers."""

    def __init__(self, max_loras: int) -> None:
        self.max_loras = max_loras
        self.meta: Optional[LoRABatchMeta] = None

    def begin(self, meta: ForwardMetadata) -> None:
        slots = meta.lora_slot_indices
        self.meta = None if slots is None else build_lora_batch_meta(slots, self.max_loras)

    def end(self) -> None:
        self.meta = None


class LoRALinear(nn.Module):
    """A fused projection plus the LoRA deltas of the adapters in the slots."""

    def __init__(self, base: LinearBase, stack: LoRAStack, batch: LoRABatch) -> None:
        super().__init__()
        self.base_layer = base
        # Row-parallel under tensor parallelism: the delta joins the partial output before the sum.
        self.all_reduce = base.all_reduce if isinstance(base, RowParallelLinear) else None
        self.batch = batch
        self.slice_sizes = stack.slice_sizes
        # Buffers (views of the manager's slot tensors), so that model.to("meta") at close drops them
        # with the weights; non-persistent: they are no part of the checkpoint.
        self.lora_a: torch.Tensor
        self.lora_b: torch.Tensor
        self.ranks: torch.Tensor
        self.scaling: torch.Tensor
        self.slice_starts: torch.Tensor
        self.register_buffer("lora_a", stack.lora_a, persistent=False)
        self.register_buffer("lora_b", stack.lora_b, persistent=False)
        self.register_buffer("ranks", stack.ranks, persistent=False)
        self.register_buffer("scaling", stack.scaling, persistent=False)
        self.register_buffer("slice_starts", stack.slice_starts, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        meta = self.batch.meta
        if self.all_reduce is not None:
            assert isinstance(base, RowParallelLinear)
            y = base.forward_partial(x)
        else:
            y = base(x)
        if meta is not None:
            add_lora(y, x.contiguous(), self.lora_a, self.lora_b, self.ranks, self.scaling, meta, self.slice_sizes,
                     self.slice_starts)
        return y if self.all_reduce is None else self.all_reduce(y)


def _projections(model: CausalLM, layer: int) -> dict[str, tuple[nn.Module, nn.Module]]:
    """Fused projection name -> (the module that owns it under that name, the projection)."""
    decoder = model.decoder_layer(layer)
    attn, mlp = decoder.self_attn, decoder.mlp
    return {"qkv_proj": (attn, attn.qkv_proj), "o_proj": (attn, attn.o_proj),
            "gate_up_proj": (mlp, mlp.gate_up_proj), "down_proj": (mlp, mlp.down_proj)}


def attach_lora(model: CausalLM, manager: MultiLoRAManager) -> LoRABatch:
    """Wraps every fused projection of `model` (after its weights are loaded) with the manager's
    slot stacks, and hooks the model's forward to read the step's slot indices."""
    batch = LoRABatch(manager.max_loras)
    for layer in range(len(model.layers)):
        owners = _projections(model, layer)
        assert set(owners) == set(FUSED_PROJECTIONS)
        for fused in manager.projections:  # projections no allowed module touches stay plain
            owner, base = owners[fused]
            assert isinstance(base, LinearBase) and (fused in ("o_proj", "down_proj")) == isinstance(
                base, RowParallelLinear), f"layer {layer} {fused} is not the expected linear layer"
            owner.register_module(fused, LoRALinear(base, manager.stack(layer, fused), batch))  # replaces it

    def before(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        # CausalLM.forward(input_ids, positions, kv_caches, meta), meta passed by position or name.
        meta = kwargs["meta"] if "meta" in kwargs else args[3]
        assert isinstance(meta, ForwardMetadata)
        batch.begin(meta)

    def after(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        batch.end()

    model.register_forward_pre_hook(before, with_kwargs=True)
    model.register_forward_hook(after)
    return batch


def enable_lora(model: CausalLM, arch: ArchConfig, config: LoRAConfig, dtype: torch.dtype,
                device: torch.device) -> Optional[MultiLoRAManager]:
    """The model runner's entry: a manager with its slots wired into the model, or None without LoRA."""
    if not config.enable_lora:
        return None
    manager = MultiLoRAManager(arch, config, dtype, device, shard_layout=LoRAShardLayout.of_model(model))
    attach_lora(model, manager)
    return manager


def token_slot_indices(manager: Optional[MultiLoRAManager], keys: Sequence[Optional[LoRAKey]],
                       num_tokens: Sequence[int], device: torch.device) -> Optional[torch.Tensor]:
    """The step's per-token slots ([T] int32 on the device; each row's slot repeated over its tokens),
    activating the rows' adapters; None when no row has one (the base-only path: no LoRA kernels)."""
    if manager is None or all(k is None for k in keys):
        return None
    slots = np.repeat(np.asarray(manager.activate(keys), dtype=np.int32), np.asarray(num_tokens))
    host = torch.from_numpy(slots)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)
