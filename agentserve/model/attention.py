"""The per-step metadata every layer of the model receives, and paged attention over it (the
step's K/V are already written to the pages by the fused rotary + KV-write kernel, see
Attention.forward in llama.py).

The backend (torch reference or Triton) is picked inside the kernels' dispatchers by device; the
model runner (and the CUDA graphs) build one ForwardMetadata per step from the step's flat tensors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from agentserve.kernels.paged_attention import paged_attention
from agentserve.model.prefill_sdpa import sdpa_prefill, use_sdpa_prefill


@dataclass
class ForwardMetadata:
    slot_mapping: torch.Tensor     # [T] int64: page slot of each new token (-1: padding)
    block_tables: torch.Tensor     # [B, max_blocks] int32
    query_start_loc: torch.Tensor  # [B + 1] int32
    seq_lens: torch.Tensor         # [B] int32: tokens in context after this step
    max_query_len: int
    max_seq_len: int
    # [T] int32: the LoRA slot of each token (-1: the base model); None while no adapter is active.
    # Not read yet: the multi-LoRA layers will take it from here, as every layer gets this object.
    lora_slot_indices: Optional[torch.Tensor] = None


def paged_attention_layer(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          meta: ForwardMetadata, scale: float, k_scale: Optional[torch.Tensor] = None,
                          v_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """k_scale / v_scale: the layer's KV scales, read when the pages are fp8."""
    if use_sdpa_prefill(q.shape[0], meta.block_tables.shape[0], meta.max_query_len, meta.max_seq_len):
        return sdpa_prefill(q, k_cache, v_cache, meta.slot_mapping, scale, k_scale, v_scale)
    return paged_attention(q, k_cache, v_cache, meta.block_tables, meta.query_start_loc, meta.seq_lens,
                           scale, meta.max_query_len, meta.max_seq_len, k_scale, v_scale)
