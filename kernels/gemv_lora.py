"""Batch-1 GEMV with the LoRA expand in its epilogue: y = x @ W^T (+ bias) + scale_s * h_s @ B_s^T.

At decode a LoRA projection is three launches: the base GEMV, the shrink (h = x @ A^T, rank r) and
the expand (y += h @ B^T). The expand reads only r x N of B and writes y once more; as a kernel of its
own it costs a launch and a pass over y (~4 us, 64 per step on an 8B with q/k/v/o adapters: ~0.27 ms
of a 4.9 ms step). Here the base GEMV's programs, which own a block of output rows, add the delta of
those rows before their one store: h comes from kernels/lora.py's shrink (its split-K partials,
summed here), B's r values per row are loaded beside the weights.

Rounding: the delta is summed in fp32 from (scale * h) rounded to B's dtype, as the expand kernel
feeds the tensor cores, and added to the base output rounded to y's dtype, so y = round(round(base)
+ delta) as with the two kernels (the delta's fp32 summation order differs: not bitwise the same).

Opt-in (AGENTSERVE_LORA_GEMV=1) until measured on the H200 against the two-kernel path.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from ._triton_utils import cdiv, next_pow2, num_sms, tl, triton
from .gemv import FMA_MAX_M, fma_launch_args, fma_program_rows, gemv_config, use_triton_gemv

LORA_GEMV: bool = os.environ.get("AGENTSERVE_LORA_GEMV", "0") == "1"


def use_gemv_lora(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Python-only decision (graph-capture safe): the flag, and a 16-bit CUDA GEMV of the fma kind
    (gemv_config picks it for every M <= FMA_MAX_M)."""
    return LORA_GEMV and use_triton_gemv(x, weight) and x.numel() // x.shape[-1] <= FMA_MAX_M


@triton.jit(do_not_specialize=["M"])
def _gemv_lora_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
    h_ptr, lb_ptr, slots_ptr, ranks_ptr, scaling_ptr, starts_ptr, max_loras,
    stride_h_split, stride_h_slice, stride_h_m, stride_b_lora, stride_b_rank, stride_rank_lora, stride_scale_lora,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    NUM_SLICES: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_R: tl.constexpr,
    USE_PDL: tl.constexpr = False, PREFETCH_W: tl.constexpr = False,
):
    """Grid: (M * cdiv(N, BLOCK_N),), as kernels/gemv.py's fma kernel."""
    m, offs_n, rows, y = fma_program_rows(x_ptr, w_ptr, M, N, K, stride_xm, stride_wn, BLOCK_N, BLOCK_K, EVEN_K,
                                          USE_PDL, PREFETCH_W)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows).to(tl.float32)
    out_ty = y_ptr.dtype.element_ty
    slot = tl.load(slots_ptr + m).to(tl.int64)
    if (slot >= 0) & (slot < max_loras):
        # Each output row's slice (q / k / v, gate / up) and that slice's rank and scale.
        s_idx = tl.zeros([BLOCK_N], dtype=tl.int32)
        for s in tl.static_range(1, NUM_SLICES):
            s_idx += (rows >= tl.load(starts_ptr + s)).to(tl.int32)
        rank = tl.load(ranks_ptr + slot * stride_rank_lora + s_idx)
        scale = tl.load(scaling_ptr + slot * stride_scale_lora + s_idx)
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r[None, :] < rank[:, None]
        h_ptrs = h_ptr + s_idx[:, None] * stride_h_slice + m * stride_h_m + offs_r[None, :]
        h = tl.zeros([BLOCK_N, BLOCK_R], dtype=tl.float32)
        for split in tl.static_range(SPLIT_K):
            h += tl.load(h_ptrs + split * stride_h_split, mask=r_mask, other=0.0)
        b = tl.load(lb_ptr + slot * stride_b_lora + offs_r[None, :] * stride_b_rank + rows[:, None],
                    mask=r_mask, other=0.0)
        delta = tl.sum((h * scale[:, None]).to(b.dtype).to(tl.float32) * b.to(tl.float32), 1)
        y = y.to(out_ty).to(tl.float32) + delta
    tl.store(y_ptr + m * stride_ym + offs_n, y.to(out_ty), mask=offs_n < N)


def gemv_add_lora(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], shrunk: torch.Tensor,
                  lora_b: torch.Tensor, ranks: torch.Tensor, scaling: torch.Tensor, token_slots: torch.Tensor,
                  slice_starts: torch.Tensor) -> torch.Tensor:
    """x [M, K] (M <= FMA_MAX_M) through weight [N, K], plus each row's adapter delta: `shrunk` is
    kernels/lora.py's lora_shrink output [SPLIT_K, num_slices, M, max_rank] for these rows,
    `token_slots` [M] their slots (-1: base), lora_b [max_loras, max_rank, N]."""
    n, k = weight.shape
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    split_k, num_slices, _, max_rank = shrunk.shape
    if m > FMA_MAX_M or lora_b.shape[2] != n or token_slots.shape != (m,) or slice_starts.shape != (num_slices + 1,):
        raise ValueError(f"gemv_add_lora: x {tuple(x.shape)} weight {tuple(weight.shape)} B {tuple(lora_b.shape)} "
                         f"slots {tuple(token_slots.shape)} (M <= {FMA_MAX_M})")
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    cfg = gemv_config(m, n, k, num_sms(x.device) if x.is_cuda else 132)
    has_bias = bias is not None
    _gemv_lora_kernel[(m * cdiv(n, cfg.block_n),)](
        x2, weight, bias if has_bias else weight, out, m, n, k, x2.stride(0), weight.stride(0), out.stride(0),
        shrunk, lora_b, token_slots, ranks, scaling, slice_starts, lora_b.shape[0],
        shrunk.stride(0), shrunk.stride(1), shrunk.stride(2), lora_b.stride(0), lora_b.stride(1),
        ranks.stride(0), scaling.stride(0),
        HAS_BIAS=has_bias, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN_K=k % cfg.block_k == 0,
        NUM_SLICES=num_slices, SPLIT_K=split_k, BLOCK_R=max(16, next_pow2(max_rank)),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **fma_launch_args(x2, None))
    return out.view(*x.shape[:-1], n)

