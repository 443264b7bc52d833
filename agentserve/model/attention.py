"""Paged attention for one layer: attend over the pages (the step's K/V are already written there
by the fused rotary + KV-write kernel, see Attention.forward in llama.py).

The backend (torch reference or Triton) is picked inside the kernels' dispatchers by device; this
module only carries the per-step metadata the model runner builds."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from agentserve.kernels.paged_attention import paged_attention


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor     # [T] int64: page slot of each new token (-1: padding)
    block_tables: torch.Tensor     # [B, max_blocks] int32
    query_start_loc: torch.Tensor  # [B + 1] int32
    seq_lens: torch.Tensor         # [B] int32: tokens in context after this step
    max_query_len: int
    max_seq_len: int


def paged_attention_layer(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          meta: AttentionMetadata, scale: float) -> torch.Tensor:
    return paged_attention(q, k_cache, v_cache, meta.block_tables, meta.query_start_loc, meta.seq_lens,
                           scale, meta.max_query_len, meta.max_seq_len)
