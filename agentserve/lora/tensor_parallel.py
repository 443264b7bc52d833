"""LoRA adapters sharded with their layers under tensor parallelism (vLLM's layout).

- Column-parallel projections (qkv_proj, gate_up_proj): the input (the hidden state) is whole on
  every rank, so every rank holds all of A; B is cut like the base weight's rows, per output slice:
  q by query heads, k and v by KV heads (replicated like the base's when there are fewer KV heads
  than ranks), gate and up by columns. This rank's outputs get exactly their columns of the delta.
- Row-parallel projections (o_proj, down_proj): the input is this rank's slice, so A is cut along
  its input like the base weight, and every rank holds all of B. Each rank adds its partial delta
  (x_r A_r^T) B^T to its partial base output before the all-reduce (lora/layers.py): the delta is
  linear in x, so the sum over the ranks is exactly (x A^T) B^T.

Rank 0's manager keeps adapters whole (its CPU tier); a slot load cuts this rank's shard, and the
other ranks get the whole adapter from rank 0 with each slot load (parallel/protocol.py), so every
rank serves the weights rank 0 read and checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from agentserve.lora.adapter import FUSED_SLICES, lora_module_shapes
from agentserve.model.arch_config import ArchConfig
from agentserve.model.llama import CausalLM

ROW_PARALLEL = ("o_proj", "down_proj")


@dataclass(frozen=True)
class LoRAShardLayout:
    size: int
    rank: int
    kv_head_replicas: int  # ranks holding the same KV head (1 unless fewer KV heads than ranks)

    @classmethod
    def of_model(cls, model: CausalLM) -> Optional["LoRAShardLayout"]:
        """The layout of the model's own shard; None for a whole (one-rank) model."""
        if model.tp is None or model.tp.size == 1:
            return None
        qkv = model.decoder_layer(0).self_attn.qkv_proj
        return cls(model.tp.size, model.tp.rank, qkv.num_kv_head_replicas)

    def _output_slice(self, module: str) -> tuple[int, int]:
        """(which slice, of how many) of a column-parallel module's outputs this rank holds; the
        same cut as the base layer's (model/linear.py QKVParallelLinear.output_shard)."""
        if module in ("k_proj", "v_proj"):
            return self.rank // self.kv_head_replicas, self.size // self.kv_head_replicas
        return self.rank, self.size

    def local_shapes(self, arch: ArchConfig) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of this rank's part of every LoRA-targetable projection."""
        local = {}
        for module, (fan_in, fan_out) in lora_module_shapes(arch).items():
            if module in ROW_PARALLEL:
                local[module] = (fan_in // self.size, fan_out)
            else:
                local[module] = (fan_in, fan_out // self._output_slice(module)[1])
        return local

    def shard(self, arch: ArchConfig, fused: str, lora_a: torch.Tensor, lora_b: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (A, B^T) of a whole adapter's stacked ones: A [..., slices, rank, in] and
        B^T [..., rank, out] (the slot layout, lora/manager.py), any leading dims."""
        if fused in ROW_PARALLEL:
            k = lora_a.shape[-1] // self.size
            return lora_a.narrow(-1, self.rank * k, k), lora_b
        whole = lora_module_shapes(arch)
        parts, start = [], 0
        for module in FUSED_SLICES[fused]:
            out = whole[module][1]
            index, count = self._output_slice(module)
            local = out // count
            parts.append(lora_b.narrow(-1, start + index * local, local))
            start += out
        return lora_a, torch.cat(parts, dim=-1)
