"""Plain building blocks: RMSNorm, rotary tables (scaled as model/rope_scaling.py says), the gated MLP."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from agentserve.kernels.activation import silu_and_mul
from agentserve.kernels.gemv_silu import FUSED_SILU_GEMV
from agentserve.kernels.rmsnorm import rms_norm
from agentserve.model.attention import ForwardMetadata
from agentserve.model.linear import LinearBase, MergedColumnParallelLinear, RowParallelLinear
from agentserve.model.parameter import LoadableParameter, default_weight_loader
from agentserve.model.rope_scaling import rope_frequencies
from agentserve.parallel.shard import TPShard


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = LoadableParameter(torch.ones(size), default_weight_loader)  # replicated on every rank
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        return rms_norm(x, self.weight, self.eps, residual)


def rope_cos_sin_cache(head_dim: int, theta: float, scaling: Optional[dict[str, Any]], max_positions: int,
                       device: torch.device) -> torch.Tensor:
    """[max_positions, head_dim] fp32: cos of the half-dim frequencies, then sin, both times the scaling's
    attention factor (as transformers applies it to cos and sin; 1.0 but for YaRN)."""
    rope = rope_frequencies(head_dim, theta, scaling)
    positions = torch.arange(max_positions, dtype=torch.int64).float()
    freqs = positions[:, None] * rope.inv_freq[None, :]
    cos, sin = freqs.cos(), freqs.sin()
    if rope.attention_factor != 1.0:
        cos, sin = cos * rope.attention_factor, sin * rope.attention_factor
    return torch.cat([cos, sin], dim=-1).to(device)


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up fused into one column-parallel projection (each
    rank holds matching slices of gate and up, so silu_and_mul stays local) and down row-parallel."""

    def __init__(self, hidden_size: int, intermediate_size: int, tp: Optional[TPShard] = None,
                 bias: bool = False) -> None:
        super().__init__()
        tp_size, tp_rank = (tp.size, tp.rank) if tp is not None else (1, 0)
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size, intermediate_size], bias=bias,
                                                       tp_size=tp_size, tp_rank=tp_rank)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=bias, tp_size=tp_size,
                                           tp_rank=tp_rank, all_reduce=tp.all_reduce if tp is not None else None)

    def forward(self, x: torch.Tensor, meta: ForwardMetadata) -> torch.Tensor:
        return self.down_proj(self.activation(x))

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        """silu(gate(x)) * up(x): one kernel where the projection's quant method fuses the activation into
        its small-batch GEMV (kernels/gemv_silu.py), else the projection and then silu_and_mul. A
        projection wrapped for LoRA (lora/layers.py) is not a LinearBase: two steps, its deltas applied."""
        proj = self.gate_up_proj
        if FUSED_SILU_GEMV and isinstance(proj, LinearBase):
            fused = proj.quant_method.apply_silu_and_mul(proj, x, proj.bias)
            if fused is not None:
                return fused
        return silu_and_mul(proj(x))
