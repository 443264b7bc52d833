"""The gate|up projection with SiLU-and-multiply in the small-batch GEMV's epilogue:
out[M, I] = silu(x @ W[:I]^T) * (x @ W[I:]^T) for a fused gate_up weight W [2I, K] (16-bit or e4m3
with per-row scales), instead of the GEMV writing [M, 2I] and a silu_and_mul kernel reading it back.

At batch 1 silu_and_mul is a ~3.3 us kernel of its own (H200 profile: 32 per Llama-3.1-8B decode step,
16 per Llama-3.2-1B draft forward, ~0.1 ms of a 4.1 ms step and ~0.2 ms of a speculative iteration).
Here each program owns BLOCK_I output columns: its weight tile holds the gate row j and the up row
I + j of each, interleaved, so the tile is the plain fma GEMV's (kernels/gemv.py: same rows per
program, same K loop, same bytes) and its sums split into the gate and up halves in registers.

Rounding follows the two-step path (projection outputs rounded to the model dtype, silu(gate) rounded
again before the multiply, as kernels/activation.py does), so the values match it; only the GEMV's
fp32 reduction order may differ between tile shapes, as it does between any two GEMV tiles.

Used where the layer's GEMV would run (model/quant.py, model/fp8.py decide: 16-bit weights at M == 1,
FP8 at M <= fp8_linear.GEMV_MAX_M); AGENTSERVE_FUSED_SILU_GEMV=0 turns it off (the H200 A/B).
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from ._triton_utils import cdiv, pdl_launch, tl, triton
from .gemv import GemvConfig, as_rows, fma_row_sums, weights_before_wait

FUSED_SILU_GEMV: bool = os.environ.get("AGENTSERVE_FUSED_SILU_GEMV", "1") == "1"


@triton.jit(do_not_specialize=["M"])
def _gemv_silu_mul_kernel(
    x_ptr, w_ptr, ws_ptr, b_ptr, y_ptr, M, I, K, stride_xm, stride_wn, stride_ym,
    HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, USE_PDL: tl.constexpr = False, W_FIRST: tl.constexpr = False,
):
    """Grid: (M * cdiv(I, BLOCK_I),); the M programs of one weight block are adjacent (the 2nd..Mth
    read of it hits L2). Tile row 2p is the gate row of output column ib * BLOCK_I + p, row 2p + 1
    its up row; out-of-range columns are clamped onto the last one (unmasked vector loads)."""
    pid = tl.program_id(0)
    m = (pid % M).to(tl.int64)
    ib = pid // M
    r = tl.arange(0, 2 * BLOCK_I)
    col = tl.minimum(ib * BLOCK_I + r // 2, I - 1)
    rows = (col + (r % 2) * I).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rows[:, None] * stride_wn + offs_k[None, :]
    sums = fma_row_sums(w_ptrs, x_ptr + m * stride_xm + offs_k, offs_k, K, 2 * BLOCK_I, BLOCK_K, EVEN_K, USE_PDL,
                        W_FIRST)
    if HAS_SCALE:
        sums = sums * tl.load(ws_ptr + rows)
    if HAS_BIAS:
        sums += tl.load(b_ptr + rows).to(tl.float32)
    dt = y_ptr.dtype.element_ty
    gate, up = tl.split(tl.reshape(sums.to(dt).to(tl.float32), [BLOCK_I, 2]))
    silu = (gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32)
    offs_out = ib * BLOCK_I + tl.arange(0, BLOCK_I)
    tl.store(y_ptr + m * stride_ym + offs_out, (silu * up).to(dt), mask=offs_out < I)


def gemv_silu_mul_triton(x: torch.Tensor, weight: torch.Tensor, config: GemvConfig,
                         weight_scale: Optional[torch.Tensor] = None,
                         bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """silu_and_mul(x @ dequant(weight)^T + bias) for x [..., K] with few rows, weight [2I, K] (16-bit,
    or e4m3 with `weight_scale` fp32 [2I]). `config` is the "fma" tile the plain GEMV would use for
    [2I, K]: a program here covers the same number of weight rows (half as many output columns)."""
    n, k = weight.shape
    if n % 2 or config.kind != "fma" or weight.stride(-1) != 1 or x.shape[-1] != k:
        raise ValueError(f"gemv_silu_mul: x {tuple(x.shape)} weight {tuple(weight.shape)} config {config} "
                         "(an even number of contiguous weight rows and an fma tile)")
    inter = n // 2
    lead = x.shape[:-1]
    x2 = as_rows(x, k)
    m = x2.shape[0]
    out = torch.empty((m, inter), dtype=x.dtype, device=x.device)
    if m == 0 or inter == 0:
        return out.view(*lead, inter)
    block_i = max(1, config.block_n // 2)
    _gemv_silu_mul_kernel[(m * cdiv(inter, block_i),)](
        x2, weight, weight_scale if weight_scale is not None else x2,
        bias.contiguous() if bias is not None else x2, out, m, inter, k, x2.stride(0), weight.stride(0), out.stride(0),
        HAS_SCALE=weight_scale is not None, HAS_BIAS=bias is not None, BLOCK_I=block_i, BLOCK_K=config.block_k,
        EVEN_K=k % config.block_k == 0, W_FIRST=weights_before_wait(weight),
        num_warps=config.num_warps, num_stages=config.num_stages, **pdl_launch(x2))
    return out.view(*lead, inter)
