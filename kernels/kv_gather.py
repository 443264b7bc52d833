"""Keys and values of one sequence gathered from their pages straight into the query heads' layout.

The first prefill chunk of a long prompt runs through cuDNN's attention (agentserve/model/prefill_sdpa.py),
which wants contiguous [heads, tokens, head_dim] keys and values with as many heads as the queries:
cuDNN takes no grouped-query layout. Gathering [T, Hkv, D] from the pages and then
`repeat_interleave` over the heads was two passes, the second a strided copy at ~0.7 TB/s: 64 kernels
and 7 ms of an 8,192-token Llama-3.1-8B prefill on the H200. Here one kernel reads each token's
key and value rows once and writes them to each of the group's query heads (an fp8 cache is
dequantized with the layer's scale on the way).
"""

from __future__ import annotations

from typing import Optional

import torch

from ._triton_utils import cdiv, next_pow2, tl, triton
from .fp8_utils import is_fp8

BLOCK_T = 32


@triton.jit
def _gather_expand_kernel(k_cache, v_cache, slots_ptr, k_out, v_out, k_scale_ptr, v_scale_ptr,
                          n_tokens, slot_stride, head_stride,
                          GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                          TOKENS: tl.constexpr, IS_FP8: tl.constexpr):
    """Grid (token blocks, kv heads): rows of `TOKENS` tokens of one kv head, written to its GROUP
    query heads in [Hq, T, D]. A slot of -1 (a token the step did not write) reads slot 0: its
    output row is never used, as on the paged path."""
    block = tl.program_id(0)
    kv_head = tl.program_id(1)
    t = block * TOKENS + tl.arange(0, TOKENS)
    d = tl.arange(0, BLOCK_D)
    t_mask = t < n_tokens
    mask = t_mask[:, None] & (d[None, :] < HEAD_DIM)
    slot = tl.maximum(tl.load(slots_ptr + t, mask=t_mask, other=0), 0).to(tl.int64)
    src = slot[:, None] * slot_stride + kv_head * head_stride + d[None, :]
    k = tl.load(k_cache + src, mask=mask, other=0.0)
    v = tl.load(v_cache + src, mask=mask, other=0.0)
    if IS_FP8:
        k = k.to(tl.float32) * tl.load(k_scale_ptr)
        v = v.to(tl.float32) * tl.load(v_scale_ptr)
    k = k.to(k_out.dtype.element_ty)
    v = v.to(v_out.dtype.element_ty)
    for g in tl.static_range(GROUP):
        head = (kv_head * GROUP + g).to(tl.int64)
        dst = head * n_tokens * HEAD_DIM + t[:, None].to(tl.int64) * HEAD_DIM + d[None, :]
        tl.store(k_out + dst, k, mask=mask)
        tl.store(v_out + dst, v, mask=mask)


def gather_expand_triton(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, num_q_heads: int,
                         dtype: torch.dtype, k_scale: Optional[torch.Tensor] = None,
                         v_scale: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pages [num_blocks, block_size, Hkv, D] at `slots` [T] -> keys and values [Hq, T, D] in `dtype`,
    kv head h serving query heads h * group .. (h + 1) * group - 1 (repeat_interleave's order)."""
    k_rows = k_cache.view(-1, k_cache.shape[-2], k_cache.shape[-1])
    v_rows = v_cache.view(-1, v_cache.shape[-2], v_cache.shape[-1])
    assert k_rows.stride() == v_rows.stride() and k_rows.stride(-1) == 1
    num_kv_heads, head_dim = k_rows.shape[1], k_rows.shape[2]
    tokens = slots.shape[0]
    fp8 = is_fp8(k_cache)
    if fp8:
        assert k_scale is not None and v_scale is not None, "an fp8 KV cache needs the layer's scales"
    k_out = torch.empty((num_q_heads, tokens, head_dim), dtype=dtype, device=k_cache.device)
    v_out = torch.empty_like(k_out)
    if tokens:
        _gather_expand_kernel[(cdiv(tokens, BLOCK_T), num_kv_heads)](
            k_rows, v_rows, slots, k_out, v_out, k_scale if fp8 else k_out, v_scale if fp8 else v_out,
            tokens, k_rows.stride(0), k_rows.stride(1), GROUP=num_q_heads // num_kv_heads, HEAD_DIM=head_dim,
            BLOCK_D=next_pow2(head_dim), TOKENS=BLOCK_T, IS_FP8=fp8, num_warps=4)
    return k_out, v_out
