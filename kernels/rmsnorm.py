"""RMSNorm with an optional fused residual add (HF semantics: x = x + residual; residual = x; out = norm(x))."""

from __future__ import annotations

from typing import Optional

import torch


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (normed, new_residual). Statistics in fp32, as transformers computes them."""
    if residual is not None:
        x = x + residual  # in the model dtype, as transformers adds residuals
    new_residual = x
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype), new_residual


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    return rms_norm_ref(x, weight, eps, residual)
