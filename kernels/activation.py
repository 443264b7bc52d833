"""SiLU-and-multiply of a fused gate|up projection: out = silu(x[:, :I]) * x[:, I:]."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton_utils import cdiv, next_pow2, pdl_begin, pdl_launch, tl, triton, triton_enabled_for


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


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if triton_enabled_for(x):
        return silu_and_mul_triton(x)
    return silu_and_mul_ref(x)
