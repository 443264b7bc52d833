"""How a linear layer stores and applies its weights (vLLM's quant_method seam).

A linear layer owns a LinearMethodBase: `create_weights` registers the parameters the method needs
(an FP8 method would add scales), `process_weights_after_loading` converts them once the checkpoint
is in, `apply` computes x @ W^T (+ bias). UnquantizedLinearMethod keeps W in the model dtype;
Fp8LinearMethod (model/fp8.py) keeps e4m3 weights with per-channel scales.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Optional

import torch
from torch import nn

from agentserve.kernels._triton_utils import num_sms
from agentserve.kernels.gemv import gemv_config, linear, use_triton_gemv
from agentserve.kernels.gemv_silu import gemv_silu_mul_triton
from agentserve.model.parameter import LoadableParameter, ShardId, WeightLoader


class LinearMethodBase(ABC):
    @abstractmethod
    def create_weights(self, layer: nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       params_dtype: torch.dtype, weight_loader: WeightLoader,
                       shard_ids: tuple[Optional[ShardId], ...]) -> None:
        """Registers the layer's weight parameters for this rank's partition: `output_partition_sizes`
        are the sizes of the fused outputs (one for a plain layer) on this rank."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Called once after every weight is loaded (repacking, quantizing)."""

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """y = x @ W^T (+ bias) for this rank's partition."""

    def apply_silu_and_mul(self, layer: nn.Module, x: torch.Tensor,
                           bias: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """silu_and_mul(apply(x)) for a fused gate|up layer as one kernel where this method's small-batch
        GEMV would run (kernels/gemv_silu.py); None elsewhere, and the caller runs the two steps."""
        return None


class UnquantizedLinearMethod(LinearMethodBase):
    def create_weights(self, layer: nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       params_dtype: torch.dtype, weight_loader: WeightLoader,
                       shard_ids: tuple[Optional[ShardId], ...]) -> None:
        weight = torch.empty(sum(output_partition_sizes), input_size_per_partition, dtype=params_dtype)
        layer.register_parameter("weight", LoadableParameter(weight, weight_loader, output_dim=0, input_dim=1,
                                                             shard_ids=shard_ids))

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        # kernels.gemv.linear: the Triton GEMV at M == 1 on CUDA (AGENTSERVE_GEMV), else F.linear.
        return linear(x, layer.weight, bias)

    def apply_silu_and_mul(self, layer: nn.Module, x: torch.Tensor,
                           bias: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        weight = layer.weight
        assert isinstance(weight, torch.Tensor)  # the parameter create_weights registered
        if not use_triton_gemv(x, weight):  # only where apply would take the Triton GEMV
            return None
        config = gemv_config(x.numel() // x.shape[-1], weight.shape[0], weight.shape[1], num_sms(x.device))
        if config.kind != "fma":
            return None
        return gemv_silu_mul_triton(x, weight, config, bias=bias)
