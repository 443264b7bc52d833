"""The e4m3 format shared by the FP8 kernels (weights and KV pages): dtype, range, saturating
rounding in torch and in Triton."""

from __future__ import annotations

import torch

from ._triton_utils import tl, triton

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448


def is_fp8(t: torch.Tensor) -> bool:
    return t.dtype == FP8_DTYPE


def to_fp8_saturated(x: torch.Tensor) -> torch.Tensor:
    """Rounds fp32 values to e4m3, saturating at +-448 (a plain cast would give NaN out of range)."""
    return x.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_kv_ref(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """K or V values -> e4m3 page contents with a per-layer scale (stored = value / scale)."""
    return to_fp8_saturated(x.float() / scale.float())


def raw_bytes(t: torch.Tensor) -> torch.Tensor:
    """A uint8 view of an fp8 tensor (index_copy_ and friends are not implemented for fp8 on every
    device); other dtypes as they are. Copies through the view move the exact bits."""
    return t.view(torch.uint8) if is_fp8(t) else t


@triton.jit
def per_token_scale(amax, FP8MAX: tl.constexpr, MINSCALE: tl.constexpr):
    """A row's e4m3 scale from its largest magnitude (fp32): that maps to FP8MAX, and the scale is
    never below MINSCALE (an all-zero row stays finite). The per-token activation quantizer's rule
    (kernels/fp8_linear.py _quant_per_token_kernel)."""
    return tl.maximum(amax / FP8MAX, MINSCALE)


@triton.jit
def scaled_to_fp8_range(x, scale, FP8MAX: tl.constexpr):
    """x / scale (fp32) saturated at +-FP8MAX, ready for the e4m3 cast (a plain cast would give
    NaN out of range): the per-token activation quantizer and the KV-cache cast (to_cache_dtype)."""
    return tl.minimum(tl.maximum(x / scale, -FP8MAX), FP8MAX)


@triton.jit
def to_cache_dtype(x, scale, out_ty: tl.constexpr, KV_FP8: tl.constexpr):
    """x (any float) -> the cache's element type: divided by the layer's scale and saturated at
    +-448 for an e4m3 cache, a plain cast otherwise."""
    if KV_FP8:
        return scaled_to_fp8_range(x.to(tl.float32), scale, 448.0).to(out_ty)
    else:
        return x.to(out_ty)
