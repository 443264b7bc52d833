"""The per-step metadata every layer of the model receives, and paged attention over it (the
step's K/V are already written to the pages by the fused rotary + KV-write kernel, see
Attention.forward in llama.py).

The backend (torch reference or Triton) is picked inside the kernels' dispatchers by device; the
model runner (and the CUDA graphs) build one ForwardMetadata per step from the step's flat tensors."""

from __future__ import annotations

import dataclasses
import os
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
    # [B] int32 (decode steps on CUDA): the requests longest context first, the unified attention kernel's
    # program order (with_decode_row_order); None: the requests in batch order.
    decode_row_order: Optional[torch.Tensor] = None


# Decode rows longest first in the unified attention kernel (batches of at least DECODE_ROW_ORDER_MIN_ROWS,
# whose grids run several waves of programs of uneven length): off until the H200 measures it
# (benchmarks/NOTES.md, eighteenth session: benchmarks/attention_order.py, then the throughput A/B).
# AGENTSERVE_DECODE_ROW_ORDER=1 turns it on.
DECODE_ROW_ORDER: bool = os.environ.get("AGENTSERVE_DECODE_ROW_ORDER", "0") == "1"
DECODE_ROW_ORDER_MIN_ROWS = 64


def orders_decode_rows(rows: int) -> bool:
    """Whether decode steps of `rows` rows take their rows longest context first (on CUDA)."""
    return DECODE_ROW_ORDER and rows >= DECODE_ROW_ORDER_MIN_ROWS


def with_decode_row_order(meta: ForwardMetadata) -> ForwardMetadata:
    """The step's metadata with its decode rows ordered longest context first, where that applies: one
    argsort per forward (inside the decode graphs, from their seq_lens buffer), read by every layer."""
    if (meta.max_query_len != 1 or not orders_decode_rows(meta.seq_lens.shape[0]) or not meta.seq_lens.is_cuda
            or meta.decode_row_order is not None):
        return meta
    order = torch.argsort(meta.seq_lens, descending=True).to(torch.int32)
    return dataclasses.replace(meta, decode_row_order=order)


def paged_attention_layer(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          meta: ForwardMetadata, scale: float, k_scale: Optional[torch.Tensor] = None,
                          v_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """k_scale / v_scale: the layer's KV scales, read when the pages are fp8."""
    if use_sdpa_prefill(q.shape[0], meta.block_tables.shape[0], meta.max_query_len, meta.max_seq_len):
        return sdpa_prefill(q, k_cache, v_cache, meta.slot_mapping, scale, k_scale, v_scale)
    return paged_attention(q, k_cache, v_cache, meta.block_tables, meta.query_start_loc, meta.seq_lens,
                           scale, meta.max_query_len, meta.max_seq_len, k_scale, v_scale, meta.decode_row_order)
