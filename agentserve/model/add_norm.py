"""The residual add and RMSNorm that follow a row-parallel projection (o_proj, down_proj), fused into the
projection's small-batch GEMV where that GEMV runs (kernels/gemv_add_norm.py), else the two steps.

Fused only where the whole output row is on this rank and nothing comes between the projection and the
add: tensor-parallel size 1 (the all-reduce would sit between them) and a plain LinearBase (a LoRA-wrapped
projection adds its delta after the base GEMV: lora/layers.py). The quant method decides whether its GEMV
would run (16-bit weights at M == 1, FP8 at M <= fp8_linear.GEMV_MAX_M).
AGENTSERVE_FUSED_ADD_NORM_GEMV=0 turns it off (the H200 A/B).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn

from agentserve.model.layers import RMSNorm
from agentserve.model.linear import RowParallelLinear

FUSED_ADD_NORM_GEMV: bool = os.environ.get("AGENTSERVE_FUSED_ADD_NORM_GEMV", "1") == "1"


def project_add_norm(proj: nn.Module, x: torch.Tensor, residual: torch.Tensor,
                     norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """norm(proj(x), residual): (the normalised row, the new residual stream)."""
    if FUSED_ADD_NORM_GEMV and isinstance(proj, RowParallelLinear) and proj.all_reduce is None:
        fused: Optional[tuple[torch.Tensor, torch.Tensor]] = proj.quant_method.apply_add_rms_norm(
            proj, x, proj.bias, residual, norm.weight, norm.eps)
        if fused is not None:
            return fused
    return norm(proj(x), residual)
