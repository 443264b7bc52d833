"""An RMSNorm followed by the projection that reads its output (a decoder layer's input_layernorm ->
qkv_proj and post_attention_layernorm -> gate_up_proj): one kernel where the projection's quant
method fuses them (kernels/gemv_norm.py: small-batch GEMV steps, AGENTSERVE_FUSED_NORM_GEMV=1),
else the norm and then the projection, as before. A projection wrapped for LoRA (lora/layers.py)
is not a LinearBase and always takes the two-step path, so its adapter deltas are applied."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from agentserve.kernels.gemv_norm import FUSED_NORM_GEMV
from agentserve.model.layers import RMSNorm
from agentserve.model.linear import LinearBase


def rms_norm_then_linear(norm: RMSNorm, linear: nn.Module, x: torch.Tensor,
                         residual: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(linear(norm(x, residual)), the new residual)."""
    if (FUSED_NORM_GEMV and isinstance(linear, LinearBase) and norm.weight.dtype == x.dtype
            and (residual is None or residual.dtype == x.dtype)):
        fused = linear.quant_method.apply_after_rms_norm(linear, x, residual, norm.weight, norm.eps, linear.bias)
        if fused is not None:
            return fused
    h, residual = norm(x, residual)
    return linear(h), residual
