"""An lm_head that computes logits from an e4m3 copy of its weight (per-row scales), for a draft model.

A speculative draft's proposals are all verified by the target, so its logits only need to rank the
likely tokens, and the lm_head is a large share of a small draft's bytes per decode step (a 128k x
2048 head is 0.5 GB of a Llama-3.2-1B's 2.5 GB in bf16). The target's lm_head stays in the model
dtype, as in vLLM's FP8 schemes: its logits are the served distribution.

The copy is a pair of buffers on the lm_head module, so a tied embedding keeps its 16-bit rows for the
lookup and closing the model (moved to "meta") frees the copy with the rest.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from agentserve.kernels.fp8_linear import fp8_linear, quantize_weight_per_channel
from agentserve.model.embedding import ParallelLMHead
from agentserve.model.parameter import ShardId, WeightLoader
from agentserve.model.quant import LinearMethodBase


class Fp8LMHeadMethod(LinearMethodBase):
    """logits = x @ dequant(weight_fp8)^T through the FP8 linear dispatcher (the FP8 GEMV at batch 1
    on CUDA, W8A8 _scaled_mm above it, the dequantizing reference elsewhere)."""

    def create_weights(self, layer: nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       params_dtype: torch.dtype, weight_loader: WeightLoader,
                       shard_ids: tuple[Optional[ShardId], ...]) -> None:
        raise TypeError("Fp8LMHeadMethod quantizes a loaded lm_head (quantize_lm_head); it creates no weights")

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        assert isinstance(layer, ParallelLMHead) and bias is None
        return fp8_linear(x, layer.weight_fp8, layer.weight_fp8_scale)


def quantize_lm_head(lm_head: ParallelLMHead) -> None:
    """Gives a loaded, unsharded lm_head an e4m3 copy of its weight and computes logits from it."""
    if lm_head.tp_size != 1:
        raise ValueError("an FP8 lm_head is for a draft model, which is never sharded (tp_size 1)")
    weight_q, weight_scale = quantize_weight_per_channel(lm_head.weight.data)
    lm_head.register_buffer("weight_fp8", weight_q, persistent=False)
    lm_head.register_buffer("weight_fp8_scale", weight_scale, persistent=False)
    lm_head.quant_method = Fp8LMHeadMethod()
