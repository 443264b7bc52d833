"""Attention of a long first prefill chunk through torch's scaled_dot_product_attention.

Time to first token at 8k tokens is the prefill's matmuls plus causal attention over 8k x 8k (~17.6
TFLOP on Llama-3.1-8B). The unified paged-attention kernel reads keys and values through the block
table; for a step that is one sequence's first chunk (no cached context: every key is one of the
step's own tokens) the pages add nothing but indirection, and cuDNN's fused attention (Hopper) or
FlashAttention run the same math on contiguous tensors. The step's keys and values are gathered
from the pages they were just written to (the rotated keys as stored; an fp8 cache is dequantized
with the layer's scales into the model dtype), so the result is the paged path's up to summation
order (and, for an fp8 cache, one more rounding of the dequantized values).

On by default (AGENTSERVE_PREFILL_ATTENTION=paged turns it off): on the H200 the 8,192-token TTFT of
a dummy Llama-3.1-8B went from 225.6 to 212.8 ms (benchmarks/NOTES.md). Only steps of one sequence
with at least SDPA_MIN_TOKENS new tokens and no context take it (decode graphs never do).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from agentserve.kernels._triton_utils import triton_enabled_for
from agentserve.kernels.fp8_utils import is_fp8
from agentserve.kernels.kv_gather import gather_expand_triton

PREFILL_SDPA: bool = os.environ.get("AGENTSERVE_PREFILL_ATTENTION", "sdpa") == "sdpa"
SDPA_MIN_TOKENS = 1024
# Fastest first where the device has them (cuDNN's Hopper kernels, then FlashAttention-2).
_CUDA_BACKENDS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]


def use_sdpa_prefill(num_tokens: int, num_seqs: int, max_query_len: int, max_seq_len: int) -> bool:
    """Host ints only: the flag, one sequence, and every token of its context new in this step."""
    return (PREFILL_SDPA and num_seqs == 1 and num_tokens == max_query_len == max_seq_len
            and num_tokens >= SDPA_MIN_TOKENS)


def _gather(cache: torch.Tensor, slots: torch.Tensor, scale: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """[T, Hkv, D] from the pages [num_blocks, block_size, Hkv, D] at the step's slots.

    A slot of -1 is a token the step did not write (the KV-pool sizing forward runs one prompt with
    every slot -1); index_select would fault on it, so it reads slot 0 instead: that row's output is
    garbage, as the paged kernel's is for such a token, and nothing reads it."""
    rows = cache.view(-1, cache.shape[-2], cache.shape[-1]).index_select(0, slots.long().clamp(min=0))
    if is_fp8(cache):
        assert scale is not None, "an fp8 KV cache needs the layer's scale"
        return (rows.float() * scale.float()).to(dtype)
    return rows.to(dtype)


def sdpa_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                 scale: float, k_scale: Optional[torch.Tensor] = None,
                 v_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Causal attention of q [T, Hq, D] over the T keys and values the step wrote at slot_mapping
    (one sequence, positions 0..T-1): [T, Hq, D] in q's dtype."""
    num_tokens, num_q_heads, _ = q.shape
    # [1, H, T, D]; KV heads repeated for grouped-query attention (cuDNN takes equal heads only).
    qh = q.transpose(0, 1).unsqueeze(0)
    if triton_enabled_for(q):  # one pass from the pages into the query heads' layout
        k_heads, v_heads = gather_expand_triton(k_cache, v_cache, slot_mapping, num_q_heads, q.dtype, k_scale, v_scale)
        kh, vh = k_heads.unsqueeze(0), v_heads.unsqueeze(0)
    else:
        k = _gather(k_cache, slot_mapping, k_scale, q.dtype)
        v = _gather(v_cache, slot_mapping, v_scale, q.dtype)
        group = num_q_heads // k.shape[1]
        kh = k.transpose(0, 1).repeat_interleave(group, dim=0).unsqueeze(0)
        vh = v.transpose(0, 1).repeat_interleave(group, dim=0).unsqueeze(0)
    if q.is_cuda:
        with sdpa_kernel(_CUDA_BACKENDS, set_priority=True):
            out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale)
    else:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale)
    return out.squeeze(0).transpose(0, 1).contiguous()
