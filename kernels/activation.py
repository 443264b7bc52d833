"""SiLU-and-multiply of a fused gate|up projection: out = silu(x[:, :I]) * x[:, I:]."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton_utils import cdiv, next_pow2, pdl_begin, pdl_launch, tl, triton, triton_enabled_for
from .fp8_linear import MIN_SCALE
from .fp8_utils import FP8_DTYPE, FP8_MAX, per_token_scale, scaled_to_fp8_range


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    inter = x.shape[-1] // 2
    return F.silu(x[..., :inter]) * x[..., inter:]


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, n_inter, BLOCK: tl.constexpr, USE_PDL: tl.constexpr = False):
    """Grid: (rows, cdiv(I, BLOCK)). Rounds silu(gate) to the output dtype before the multiply, as
    the reference's two torch ops do (F.silu computes in fp32 and rounds)."""
    pdl_begin(USE_PDL)  # programmatic dependent launch: kernels/_triton_utils.py
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_inter
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + n_inter + cols, mask=mask, other=0.0).to(tl.float32)
    dt = out_ptr.dtype.element_ty
    silu = (gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (silu * up).to(dt), mask=mask)


def silu_and_mul_triton(x: torch.Tensor) -> torch.Tensor:
    inter = x.shape[-1] // 2
    out_shape = (*x.shape[:-1], inter)
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty((x2.shape[0], inter), dtype=x.dtype, device=x.device)
    if x2.shape[0] == 0 or inter == 0:
        return out.view(out_shape)
    block = min(1024, next_pow2(inter))
    _silu_and_mul_kernel[(x2.shape[0], cdiv(inter, block))](
        x2, out, x2.stride(0), out.stride(0), inter, BLOCK=block, num_warps=4 if block >= 512 else 1, **pdl_launch(x2))
    return out.view(out_shape)


@triton.jit
def _silu_and_mul_fp8_kernel(x_ptr, out_ptr, q_ptr, s_ptr, stride_x, stride_o, stride_q, n_inter,
                             FP8MAX: tl.constexpr, MINSCALE: tl.constexpr, BLOCK: tl.constexpr,
                             USE_PDL: tl.constexpr = False):
    """Grid: (rows,). silu_and_mul of a row plus its per-token e4m3 quantization: the first pass
    stores the 16-bit row and finds its absmax, the second recomputes it (the same ops, from the
    inputs: no read of what other threads stored) and stores the quantized row. Bitwise what
    _silu_and_mul_kernel then kernels/fp8_linear.py's _quant_per_token_kernel give."""
    pdl_begin(USE_PDL)  # programmatic dependent launch: kernels/_triton_utils.py
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    dt = out_ptr.dtype.element_ty
    amax = tl.zeros([BLOCK], tl.float32)
    for c0 in range(0, n_inter, BLOCK):
        cols = c0 + offs
        mask = cols < n_inter
        gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + row * stride_x + n_inter + cols, mask=mask, other=0.0).to(tl.float32)
        val = ((gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32) * up).to(dt)
        tl.store(out_ptr + row * stride_o + cols, val, mask=mask)
        amax = tl.maximum(amax, tl.abs(val.to(tl.float32)))
    scale = per_token_scale(tl.max(amax, 0), FP8MAX, MINSCALE)
    tl.store(s_ptr + row, scale)
    for c0 in range(0, n_inter, BLOCK):
        cols = c0 + offs
        mask = cols < n_inter
        gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + row * stride_x + n_inter + cols, mask=mask, other=0.0).to(tl.float32)
        val = ((gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32) * up).to(dt).to(tl.float32)
        q = scaled_to_fp8_range(val, scale, FP8MAX)
        tl.store(q_ptr + row * stride_q + cols, q.to(q_ptr.dtype.element_ty), mask=mask)


def silu_and_mul_fp8_out(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """silu_and_mul_triton of 2-D x [T, 2I] plus the output's per-token e4m3 quantization, in one
    kernel: (out [T, I], out_q e4m3 [T, I], out_scale fp32 [T, 1]), bitwise what
    quantize_per_token_triton(out) returns (an FP8 layer reading `out` skips that pass)."""
    inter = x.shape[-1] // 2
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"silu_and_mul_fp8_out: x must be a row-contiguous 2-D tensor, got {tuple(x.shape)}")
    rows = x.shape[0]
    out = torch.empty((rows, inter), dtype=x.dtype, device=x.device)
    xq = torch.empty((rows, inter), dtype=FP8_DTYPE, device=x.device)
    xs = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    if rows == 0:
        return out, xq, xs
    block = min(2048, next_pow2(inter))
    _silu_and_mul_fp8_kernel[(rows,)](
        x, out, xq, xs, x.stride(0), out.stride(0), xq.stride(0), inter, FP8MAX=FP8_MAX, MINSCALE=MIN_SCALE,
        BLOCK=block, num_warps=4 if block >= 512 else 1, **pdl_launch(x))
    return out, xq, xs


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if triton_enabled_for(x):
        return silu_and_mul_triton(x)
    return silu_and_mul_ref(x)
