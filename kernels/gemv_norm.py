"""RMSNorm (with its residual add) fused into the prologue of the small-batch GEMV that reads its output.

A decoder layer's two norms each feed one projection (input_layernorm -> qkv, post_attention_layernorm
-> gate_up). At batch 1 the norm is a ~4 us kernel of its own (8 KB in, 16 KB out), 64 per Llama-3.1-8B
step and 32 per Llama-3.2-1B draft step: on the H200 the RMSNorms were 0.77 ms of a speculative
iteration's ~7.9 ms of device work (benchmarks/RESULTS.md, spec_profile). Here every GEMV program
first reads the whole activation row (and the residual) from L2 to compute the row's statistics,
then runs the fma GEMV's K loop (kernels/gemv.py) over the normalized values, computed chunk by chunk
from the same rows; the programs of the first weight block also store the residual sum. The rounding
follows rms_norm step by step (the residual sum and the normalized row rounded to the model dtype,
the weight product rounded once), so the GEMV sees rms_norm's values; only the fp32 order of the
row's sum of squares may differ (a different reduction tree).

Off by default until measured on the H200: AGENTSERVE_FUSED_NORM_GEMV=1 turns it on (model/norm_linear.py
asks the layer's quant method, which fuses only where its GEMV would run: 16-bit weights through the
Triton GEMV at M == 1, FP8 weights through the FP8 GEMV at M <= its limit).
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from ._triton_utils import cdiv, next_pow2, num_sms, pdl_begin, pdl_launch, tl, triton
from .gemv import GemvConfig, as_rows, fma_program_tile

FUSED_NORM_GEMV: bool = os.environ.get("AGENTSERVE_FUSED_NORM_GEMV", "0") == "1"


@triton.jit(do_not_specialize=["M"])
def _rms_norm_gemv_kernel(
    x_ptr, res_ptr, nw_ptr, new_res_ptr, w_ptr, ws_ptr, b_ptr, y_ptr,
    M, N, K, stride_xm, stride_rm, stride_nm, stride_wn, stride_ym, eps,
    HAS_RESIDUAL: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ROW: tl.constexpr, EVEN_K: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    """Grid: (M * cdiv(N, BLOCK_N),), the M programs of one weight block adjacent (as the fma GEMV)."""
    m, nb, offs_n, rows, offs_k, w_ptrs = fma_program_tile(w_ptr, M, N, stride_wn, BLOCK_N, BLOCK_K)
    pdl_begin(USE_PDL)  # x and the residual are the previous kernel's output: kernels/_triton_utils.py
    # The row's statistics, over the residual sum rounded to the model dtype (rms_norm's order).
    offs_row = tl.arange(0, ROW)
    row_mask = offs_row < K
    s = tl.load(x_ptr + m * stride_xm + offs_row, mask=row_mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + m * stride_rm + offs_row, mask=row_mask, other=0.0).to(tl.float32)
        s16 = (s + r).to(x_ptr.dtype.element_ty)
        if nb == 0:  # one block of programs writes the new residual; the others only read x and r
            tl.store(new_res_ptr + m * stride_nm + offs_row, s16, mask=row_mask)
        s = s16.to(tl.float32)
    inv = tl.rsqrt(tl.sum(s * s, 0) / K + eps)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        if EVEN_K:
            xk = tl.load(x_ptr + m * stride_xm + kk).to(tl.float32)
            nw = tl.load(nw_ptr + kk).to(tl.float32)
            w = tl.load(w_ptrs)
            if HAS_RESIDUAL:
                xk = (xk + tl.load(res_ptr + m * stride_rm + kk).to(tl.float32)).to(x_ptr.dtype.element_ty)
        else:
            k_mask = kk < K
            xk = tl.load(x_ptr + m * stride_xm + kk, mask=k_mask, other=0.0).to(tl.float32)
            nw = tl.load(nw_ptr + kk, mask=k_mask, other=0.0).to(tl.float32)
            w = tl.load(w_ptrs, mask=k_mask[None, :], other=0.0)
            if HAS_RESIDUAL:
                r_k = tl.load(res_ptr + m * stride_rm + kk, mask=k_mask, other=0.0).to(tl.float32)
                xk = (xk + r_k).to(x_ptr.dtype.element_ty)
        normed = (xk.to(tl.float32) * inv).to(x_ptr.dtype.element_ty).to(tl.float32)
        xin = (nw * normed).to(y_ptr.dtype.element_ty).to(tl.float32)
        acc += w.to(tl.float32) * xin[None, :]
        w_ptrs += BLOCK_K
    y = tl.sum(acc, 1)
    if HAS_SCALE:  # FP8 weights: the channel scale, once on the sum (as the FP8 GEMV)
        y = y * tl.load(ws_ptr + rows)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + offs_n, y.to(y_ptr.dtype.element_ty), mask=offs_n < N)


def rms_norm_gemv_triton(x: torch.Tensor, residual: Optional[torch.Tensor], norm_weight: torch.Tensor, eps: float,
                         weight: torch.Tensor, config: GemvConfig, weight_scale: Optional[torch.Tensor] = None,
                         bias: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(linear(rms_norm(x, residual)), the new residual) for x [..., K] with few rows; `weight` [N, K]
    16-bit, or e4m3 with `weight_scale` [N]; `config`: the GEMV's own ("fma") tiles for this weight.
    The norm weight and the residual have x's dtype (the caller checks)."""
    n, k = weight.shape
    lead = x.shape[:-1]
    x2 = as_rows(x, k)
    m = x2.shape[0]
    r2 = residual.reshape(-1, k).contiguous() if residual is not None else None
    new_res = torch.empty_like(x2) if r2 is not None else x2
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m and n:
        assert config.kind == "fma", "the fused norm follows the fma GEMV's K loop"
        placeholder = weight_scale if weight_scale is not None else x2
        _rms_norm_gemv_kernel[(m * cdiv(n, config.block_n),)](
            x2, r2 if r2 is not None else x2, norm_weight, new_res, weight, placeholder,
            bias if bias is not None else placeholder, y, m, n, k, x2.stride(0),
            r2.stride(0) if r2 is not None else 0, new_res.stride(0), weight.stride(0), y.stride(0), float(eps),
            HAS_RESIDUAL=r2 is not None, HAS_SCALE=weight_scale is not None, HAS_BIAS=bias is not None,
            BLOCK_N=config.block_n, BLOCK_K=config.block_k, ROW=next_pow2(k), EVEN_K=k % config.block_k == 0,
            num_warps=config.num_warps, num_stages=config.num_stages, **pdl_launch(x2))
    out_res = new_res.view(x.shape) if r2 is not None else x
    return y.view(*lead, n), out_res


def sms_of(x: torch.Tensor) -> int:
    return num_sms(x.device) if x.is_cuda else 132
