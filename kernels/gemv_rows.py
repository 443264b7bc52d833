"""Weight-stationary GEMV for a few rows: y[M, N] = x[M, K] @ W[N, K]^T (+ bias), 2 <= M <= ROWS_MAX_M,
16-bit weights.

A speculative verification at batch 1 is an M = k + 1 forward (5 rows at k = 4): still a stream of
weight reads, but cuBLAS's skinny GEMMs reach 2.7-4.1 TB/s on the 8B's projections there (qkv 15.8 us,
o 12.2 us, down 31.7 us, gate_up 57.4 us on the H200; benchmarks/RESULTS.md, spec_profile), where
the one-row GEMV (kernels/gemv.py) reaches more; the verification is then ~0.4 ms slower than a
decode step, which speculation's theory counts as equal. The fma GEMV's M > 1 scheme (one program
per row of x, re-reading the block from L2) would need M times the L2 traffic.

Here one program loads each weight tile once and multiplies it against all M rows of x (padded to
BLOCK_M, a power of two; padded rows are clamped copies of the last row, never stored): fp32 partial
products accumulate elementwise in a [BLOCK_M, BLOCK_N, BLOCK_K] register tile over the K loop and
are reduced once at the end, as in the one-row fma kernel, so the loop stays loads + FMAs. The
register tile is BLOCK_M times the one-row kernel's for the same weight tile, so BLOCK_K shrinks.

Dispatch (kernels/gemv.linear): AGENTSERVE_GEMV_ROWS=1 turns it on for CUDA 16-bit calls with
2 <= M <= ROWS_MAX_M (off by default until the H200 sweep, benchmarks/gemv_rows.py).
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from ._triton_utils import cdiv, next_pow2, pdl_begin, pdl_launch, tl, triton

GEMV_ROWS: bool = os.environ.get("AGENTSERVE_GEMV_ROWS", "0") == "1"
ROWS_MAX_M: int = 8


@triton.jit(do_not_specialize=["M"])
def _gemv_rows_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, USE_PDL: tl.constexpr = False,
):
    """Grid: (cdiv(N, BLOCK_N),). Out-of-range weight rows and x rows are clamped, not masked: the hot
    loads stay unmasked and vectorised; only the store is masked."""
    nb = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = tl.minimum(offs_m, M - 1).to(tl.int64)
    w_rows = tl.minimum(offs_n, N - 1).to(tl.int64)
    x_ptrs = x_ptr + x_rows[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + w_rows[:, None] * stride_wn + offs_k[None, :]
    pdl_begin(USE_PDL)  # programmatic dependent launch: kernels/_triton_utils.py (x is the previous output)
    acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs)
            x = tl.load(x_ptrs)
        else:
            k_mask = offs_k + k0 < K
            w = tl.load(w_ptrs, mask=k_mask[None, :], other=0.0)
            x = tl.load(x_ptrs, mask=k_mask[None, :], other=0.0)
        acc += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    y = tl.sum(acc, 2)
    if HAS_BIAS:
        y += tl.load(b_ptr + w_rows).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def rows_config(m: int, n: int, k: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps): the one-row fma tile's weight rows, with BLOCK_K cut so the
    register tile BLOCK_M x BLOCK_N x BLOCK_K stays at 8,192 fp32 partials (64 per thread at 4 warps)."""
    block_m = max(2, next_pow2(m))
    block_n = 2 if k >= 8192 else 4
    block_k = max(64, min(next_pow2(k), 8192 // (block_m * block_n)))
    return block_n, block_k, 4


def gemv_rows_triton(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                     config: Optional[tuple[int, int, int]] = None) -> torch.Tensor:
    """F.linear's contract for x [..., K] with prod(leading dims) <= ROWS_MAX_M and weight [N, K] with
    contiguous rows. `config` = (BLOCK_N, BLOCK_K, num_warps) overrides rows_config (tests, the sweep)."""
    n, k = weight.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m > ROWS_MAX_M or x.shape[-1] != k or weight.stride(-1) != 1:
        raise ValueError(f"gemv_rows: x {tuple(x.shape)} weight {tuple(weight.shape)} "
                         f"(M <= {ROWS_MAX_M}, contiguous weight rows)")
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out.view(*lead, n)
    if k == 0:
        out.zero_()
        if bias is not None:
            out += bias
        return out.view(*lead, n)
    block_n, block_k, warps = config or rows_config(m, n, k)
    _gemv_rows_kernel[(cdiv(n, block_n),)](
        x2, weight, bias.contiguous() if bias is not None else weight, out, m, n, k, x2.stride(0), weight.stride(0),
        out.stride(0), HAS_BIAS=bias is not None, BLOCK_M=max(2, next_pow2(m)), BLOCK_N=block_n, BLOCK_K=block_k,
        EVEN_K=k % block_k == 0, num_warps=warps, num_stages=1, **pdl_launch(x2))
    return out.view(*lead, n)
