"""Two-row GEMVs: each weight tile loaded (and, for e4m3, converted) once for both rows of x.

The small-batch "fma" GEMV (kernels/gemv.py) runs M programs per weight block for M rows, adjacent so
that the 2nd row's read of the block hits L2. At M = 2 that doubles the programs, their ramp-up and the
conversions of FP8 tiles, for the same HBM bytes. An FP8 draft model's catch-up after every
speculative verification is such a 2-token forward (spec/continuation.py): on the H200 it took 0.86 ms
against 0.69 ms for the draft's 1-token decode step (benchmarks/NOTES.md, fifteenth session), about
64 GEMVs x ~2.7 us. Here one program holds two fp32 accumulators: the tile's bytes are read and
converted once, and each weight feeds two FMAs.

Used for M == 2 by fp8_linear.fp8_gemv_triton and (through fma_row_sums_pair, its gate_up + SiLU kernel)
gemv_silu.gemv_silu_mul_triton when PAIR_ROWS is on (AGENTSERVE_GEMV_PAIR_ROWS=1; off until measured on
the H200). The sums are the one-row kernel's up to the fp32 reduction order (same tiles, same K loop).
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from ._triton_utils import cdiv, pdl_begin, pdl_launch, tl, triton

PAIR_ROWS: bool = os.environ.get("AGENTSERVE_GEMV_PAIR_ROWS", "0") == "1"


@triton.jit
def fma_row_sums_pair(w_ptrs, x0_ptrs, x1_ptrs, offs_k, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      EVEN_K: tl.constexpr, USE_PDL: tl.constexpr):
    """fma_row_sums (kernels/gemv.py) for two rows of x over the same weight tiles: (sums of row 0,
    sums of row 1), each [BLOCK_N] fp32. Holds the PDL wait, as fma_row_sums does."""
    pdl_begin(USE_PDL)  # programmatic dependent launch: kernels/_triton_utils.py
    acc0 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs)
            x0 = tl.load(x0_ptrs)
            x1 = tl.load(x1_ptrs)
        else:
            k_mask = offs_k + k0 < K
            w = tl.load(w_ptrs, mask=k_mask[None, :], other=0.0)
            x0 = tl.load(x0_ptrs, mask=k_mask, other=0.0)
            x1 = tl.load(x1_ptrs, mask=k_mask, other=0.0)
        wf = w.to(tl.float32)
        acc0 += wf * x0.to(tl.float32)[None, :]
        acc1 += wf * x1.to(tl.float32)[None, :]
        w_ptrs += BLOCK_K
        x0_ptrs += BLOCK_K
        x1_ptrs += BLOCK_K
    return tl.sum(acc0, 1), tl.sum(acc1, 1)


@triton.jit
def scaled_pair(s0, s1, rows, ws_ptr, b_ptr, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Both rows' sums times the weight rows' scales (once per output, not per weight), plus the bias."""
    if HAS_SCALE:
        scale = tl.load(ws_ptr + rows)
        s0 *= scale
        s1 *= scale
    if HAS_BIAS:
        bias = tl.load(b_ptr + rows).to(tl.float32)
        s0 += bias
        s1 += bias
    return s0, s1


@triton.jit
def _fp8_gemv_pair_kernel(
    x_ptr, w_ptr, ws_ptr, b_ptr, y_ptr, N, K, stride_xm, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    """Grid: (cdiv(N, BLOCK_N),): y[0:2, block] from e4m3 W with per-row scales (fp8_linear's GEMV)."""
    nb = tl.program_id(0)
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rows[:, None] * stride_wn + offs_k[None, :]
    y0, y1 = fma_row_sums_pair(w_ptrs, x_ptr + offs_k, x_ptr + stride_xm + offs_k, offs_k, K, BLOCK_N, BLOCK_K,
                               EVEN_K, USE_PDL)
    y0, y1 = scaled_pair(y0, y1, rows, ws_ptr, b_ptr, True, HAS_BIAS)
    dt = y_ptr.dtype.element_ty
    mask = offs_n < N
    tl.store(y_ptr + offs_n, y0.to(dt), mask=mask)
    tl.store(y_ptr + stride_ym + offs_n, y1.to(dt), mask=mask)


def set_pair_rows(enabled: bool) -> None:
    """Whether M == 2 GEMVs take the two-row kernels (tests and A/B runs; AGENTSERVE_GEMV_PAIR_ROWS)."""
    global PAIR_ROWS
    PAIR_ROWS = enabled


def pair_warps(block_n: int, block_k: int, num_warps: int) -> int:
    """Warps for a two-row program over the one-row tile: enough that each thread's two accumulators
    stay at <= 64 fp32 registers (the one-row kernel's tiles hold up to 64 per thread)."""
    while block_n * block_k // (32 * num_warps) > 32 and num_warps < 16:
        num_warps *= 2
    return num_warps


def fp8_gemv_pair(x2: torch.Tensor, weight_q: torch.Tensor, weight_scale: torch.Tensor, bias: Optional[torch.Tensor],
                  out: torch.Tensor, block_n: int, block_k: int, num_warps: int, num_stages: int) -> None:
    """out[2, N] = x2[2, K] @ (W_q * scale)^T (+ bias), fp8_gemv_triton's contract at M == 2."""
    n, k = weight_q.shape
    _fp8_gemv_pair_kernel[(cdiv(n, block_n),)](
        x2, weight_q, weight_scale, bias if bias is not None else weight_scale, out, n, k, x2.stride(0),
        weight_q.stride(0), out.stride(0), HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k,
        EVEN_K=k % block_k == 0, num_warps=pair_warps(block_n, block_k, num_warps), num_stages=num_stages,
        **pdl_launch(x2))
