"""RMSNorm with an optional fused residual add (HF semantics: x = x + residual; residual = x; out = norm(x))."""

from __future__ import annotations

from typing import Optional

import torch

from ._triton_utils import next_pow2, pdl_begin, pdl_launch, tl, triton, triton_enabled_for


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (normed, new_residual). Statistics in fp32, as transformers computes them."""
    if residual is not None:
        x = x + residual  # in the model dtype, as transformers adds residuals
    new_residual = x
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype), new_residual


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, new_res_ptr,
    x_so, x_si, r_so, r_si, o_so, o_si, n_so, n_si,
    n_inner, n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    """Grid: (rows,). A row is the last dim; rows are addressed as (outer, inner) so a strided
    [T, H, D] view (per-head q/k norm of a fused qkv output) needs no copy.

    Rounding follows the reference step by step: the residual sum is rounded to the model dtype
    (new_res dtype) before the statistics, the normalised row is rounded to the model dtype before
    the weight multiply, and that product is rounded once to the output dtype."""
    row = tl.program_id(0).to(tl.int64)
    outer = row // n_inner
    inner = row % n_inner
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    # The weight is never written during a step: it loads before the PDL wait (the wait ends the
    # previous kernel; only x and the residual are its output).
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    pdl_begin(USE_PDL)  # programmatic dependent launch: kernels/_triton_utils.py
    x = tl.load(x_ptr + outer * x_so + inner * x_si + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + outer * r_so + inner * r_si + offs, mask=mask, other=0.0).to(tl.float32)
        s = (x + r).to(new_res_ptr.dtype.element_ty)
        tl.store(new_res_ptr + outer * n_so + inner * n_si + offs, s, mask=mask)
        x = s.to(tl.float32)
    var = tl.sum(x * x, 0) / n_cols
    normed = (x * tl.rsqrt(var + eps)).to(new_res_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + outer * o_so + inner * o_si + offs, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)


def _row_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(outer stride, inner stride, inner count) of a 2-D or 3-D tensor with a contiguous last dim."""
    if t.dim() == 2:
        return t.stride(0), 0, 1
    return t.stride(0), t.stride(1), t.shape[1]


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float,
                    residual: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as rms_norm_ref: returns fresh (out, new_residual) tensors (new_residual is x
    itself without a residual); inputs are never modified."""
    orig_x, orig_shape, hidden = x, x.shape, x.shape[-1]
    if x.dim() not in (2, 3):  # 1-D or >3-D: flatten to rows (a copy only if the layout needs it)
        x = x.reshape(-1, hidden)
    if x.stride(-1) != 1:
        x = x.contiguous()
    if residual is not None:
        residual = residual.reshape(x.shape)
        if residual.stride(-1) != 1:
            residual = residual.contiguous()
    model_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, model_dtype), device=x.device)
    new_res = x if residual is None else torch.empty(x.shape, dtype=model_dtype, device=x.device)
    rows = x.numel() // hidden if hidden else 0
    if rows > 0:
        block = next_pow2(hidden)
        num_warps = 1 if block <= 256 else 4 if block <= 2048 else 8 if block <= 8192 else 16
        x_so, x_si, n_inner = _row_strides(x)
        r_so, r_si, _ = _row_strides(residual) if residual is not None else (0, 0, 1)
        o_so, o_si, _ = _row_strides(out)
        n_so, n_si, _ = _row_strides(new_res)
        _rms_norm_kernel[(rows,)](
            x, residual if residual is not None else x, weight.contiguous(), out, new_res,
            x_so, x_si, r_so, r_si, o_so, o_si, n_so, n_si, n_inner, hidden, float(eps),
            HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=num_warps, **pdl_launch(x),
        )
    if residual is None:
        return out.view(orig_shape), orig_x
    return out.view(orig_shape), new_res.view(orig_shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    if triton_enabled_for(x):
        return rms_norm_triton(x, weight, eps, residual)
    return rms_norm_ref(x, weight, eps, residual)
