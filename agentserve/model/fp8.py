"""Fp8LinearMethod: e4m3 weights with one fp32 scale per output channel, applied by
kernels.fp8_linear (FP8 GEMV at batch 1 and _scaled_mm with dynamic per-token activation scales on
CUDA; dequantize-then-matmul on CPU).

Whatever the checkpoint's layout, a layer ends up (process_weights_after_loading) with:
  weight        float8_e4m3fn [N, K]
  weight_scale  float32 [N]            W ~= weight * weight_scale[:, None]
  input_scale   float32 [1] or None    static activation scale (checkpoints that have one)
Per-tensor scales of a fused layer (one per q/k/v or gate/up shard) expand exactly into channel
scales. 128x128 block scales are dequantized and re-quantized per channel: one more e4m3 rounding of
each weight, in exchange for one GEMM path (vLLM runs a block-scaled GEMM instead).

`quantize_linear_layers` swaps the method of a built model's linear layers (the model classes
construct UnquantizedLinearMethod; the lm_head and embeddings stay in the model dtype, as in vLLM;
a pre-quantized checkpoint's FP8 layers are those it stores weight scales for, model/fp8_checkpoint.py).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from agentserve.kernels._triton_utils import num_sms
from agentserve.kernels.fp8_gemv_tiles import device_name_of, fp8_gemv_config
from agentserve.kernels.fp8_linear import FP8_DTYPE, dequantize_weight, fp8_linear, use_fp8_gemv
from agentserve.kernels.gemv_silu import gemv_silu_mul_triton
from agentserve.model.fp8_tp import check_block_split, quantize_per_channel, rank_block_scales
from agentserve.model.linear import LinearBase
from agentserve.model.parameter import LoadableParameter, ShardId, WeightLoader, WeightShapeError, copy_checked
from agentserve.model.quant import LinearMethodBase
from agentserve.model.quant_config import Fp8Config

# Our fused layer -> the checkpoint projections it holds (which of them the checkpoint quantized).
_FUSED_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class Fp8LinearMethod(LinearMethodBase):
    def __init__(self, config: Fp8Config) -> None:
        self.config = config

    # --- parameters --------------------------------------------------------------------------------
    def create_weights(self, layer: nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       params_dtype: torch.dtype, weight_loader: WeightLoader,
                       shard_ids: tuple[Optional[ShardId], ...]) -> None:
        cfg = self.config
        n, k = sum(output_partition_sizes), input_size_per_partition
        # Online quantization loads the 16-bit checkpoint as is and quantizes it after loading.
        dtype = FP8_DTYPE if cfg.checkpoint_fp8 else params_dtype
        layer.register_parameter("weight", LoadableParameter(
            torch.empty(n, k, dtype=dtype), weight_loader, output_dim=0, input_dim=1, shard_ids=shard_ids))
        if not cfg.checkpoint_fp8:
            return
        if cfg.weight_strategy == "channel":
            def channel_loader(param: LoadableParameter, loaded_weight: torch.Tensor,
                               shard_id: Optional[ShardId] = None) -> None:
                weight_loader(param, loaded_weight.reshape(-1, 1), shard_id)  # [n] and [n, 1] both occur
            scale = LoadableParameter(torch.empty(n, 1, dtype=torch.float32), channel_loader, output_dim=0,
                                      shard_ids=shard_ids)
        elif cfg.weight_strategy == "tensor":
            scale = LoadableParameter(torch.empty(len(shard_ids), dtype=torch.float32),
                                      _per_shard_scalar_loader(shard_ids), shard_ids=shard_ids)
        else:
            assert isinstance(layer, LinearBase)
            check_block_split(layer, shard_ids, cfg.block_size)  # tensor parallelism cuts whole blocks
            bn, bk = cfg.block_size
            rows = sum(_cdiv(s, bn) for s in output_partition_sizes)
            scale = LoadableParameter(torch.empty(rows, _cdiv(k, bk), dtype=torch.float32),
                                      _block_scale_loader(layer, shard_ids, output_partition_sizes, cfg.block_size),
                                      shard_ids=shard_ids)
        layer.register_parameter(cfg.scale_name, scale)
        if cfg.static_activations:
            layer.register_parameter("input_scale", LoadableParameter(
                torch.empty(len(shard_ids), dtype=torch.float32), _per_shard_scalar_loader(shard_ids),
                shard_ids=shard_ids))

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        assert isinstance(layer, LinearBase)
        cfg = self.config
        weight = layer.weight.data
        if not cfg.checkpoint_fp8:
            weight_q, scale = quantize_per_channel(layer, weight)
        elif cfg.weight_strategy == "channel":
            weight_q, scale = weight, layer.weight_scale.data.reshape(-1)
        elif cfg.weight_strategy == "tensor":
            sizes = torch.tensor(layer.output_partition_sizes, device=weight.device)
            weight_q, scale = weight, torch.repeat_interleave(layer.weight_scale.data, sizes)
        else:
            weight_q, scale = quantize_per_channel(layer, self._dequantize_blocks(layer))
            delattr(layer, cfg.scale_name)
        layer.weight = nn.Parameter(weight_q.contiguous(), requires_grad=False)
        layer.weight_scale = nn.Parameter(scale.float().contiguous(), requires_grad=False)
        if cfg.static_activations:
            # x is quantized once for all shards of a fused layer: the largest scale clips none of them.
            layer.input_scale = nn.Parameter(layer.input_scale.data.max().reshape(1), requires_grad=False)

    def _dequantize_blocks(self, layer: LinearBase) -> torch.Tensor:
        bn, bk = self.config.block_size
        block_scales = getattr(layer, self.config.scale_name).data
        k = layer.weight.shape[1]
        parts, row = [], 0
        for size, weight in zip(layer.output_partition_sizes, layer.weight.data.split(layer.output_partition_sizes)):
            nb = _cdiv(size, bn)
            s = block_scales[row:row + nb].repeat_interleave(bn, 0)[:size].repeat_interleave(bk, 1)[:, :k]
            parts.append(weight.float() * s)
            row += nb
        return torch.cat(parts)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        input_scale = layer.input_scale if self.config.static_activations else None
        return fp8_linear(x, layer.weight, layer.weight_scale, bias, input_scale)

    def apply_silu_and_mul(self, layer: nn.Module, x: torch.Tensor,
                           bias: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        assert isinstance(layer, LinearBase)  # quantize_linear_layers gives this method to linear layers only
        weight = layer.weight
        input_scale = layer.input_scale if self.config.static_activations else None
        # Only where apply would take the FP8 GEMV.
        if not (use_fp8_gemv(x, input_scale) and weight.dtype == FP8_DTYPE and weight.stride(-1) == 1):
            return None
        config = fp8_gemv_config(weight.shape[0], weight.shape[1], num_sms(x.device), x.numel() // x.shape[-1],
                                 kernel="gemv_silu", device_name=device_name_of(x.device))
        return gemv_silu_mul_triton(x, weight, config, layer.weight_scale, bias)


def _per_shard_scalar_loader(shard_ids: tuple[Optional[ShardId], ...]) -> WeightLoader:
    """One scalar per checkpoint projection of a fused layer (per-tensor weight or input scales)."""
    def load(param: LoadableParameter, loaded_weight: torch.Tensor, shard_id: Optional[ShardId] = None) -> None:
        if loaded_weight.numel() != 1:
            raise WeightShapeError(f"has shape {tuple(loaded_weight.shape)}, a per-tensor scale has one element")
        if shard_id is None and len(shard_ids) > 1:  # a checkpoint that fused the projections
            param.data.fill_(float(loaded_weight.reshape(())))
            return
        param.data[shard_ids.index(shard_id)] = loaded_weight.reshape(()).float()
    return load


def _block_scale_loader(layer: LinearBase, shard_ids: tuple[Optional[ShardId], ...], sizes: list[int],
                        block: tuple[int, int]) -> WeightLoader:
    """A shard's [ceil(n / block_n), ceil(k / block_k)] block scales into its rows of the fused
    parameter (each shard's blocks start at a block boundary of its own rows); under tensor
    parallelism, this rank's blocks of them (model/fp8_tp.py)."""
    block_n, block_k = block
    offsets = [sum(_cdiv(s, block_n) for s in sizes[:i]) for i in range(len(sizes))]

    def load(param: LoadableParameter, loaded_weight: torch.Tensor, shard_id: Optional[ShardId] = None) -> None:
        if shard_id is None and len(shard_ids) > 1:
            raise WeightShapeError("block scales of a fused projection must come per projection")
        i = shard_ids.index(shard_id)
        rows = _cdiv(sizes[i], block_n)
        copy_checked(param.data.narrow(0, offsets[i], rows),
                     rank_block_scales(layer, loaded_weight, shard_id, rows, block_k).float())
    return load


def _checkpoint_modules(name: str) -> list[str]:
    """The checkpoint's names of the projections a layer of ours holds."""
    prefix, _, leaf = name.rpartition(".")
    parts = _FUSED_PARTS.get(leaf, (leaf,))
    return [f"model.{prefix}.{p}" if prefix else p for p in parts]


def quantize_linear_layers(model: nn.Module, config: Fp8Config,
                           quantized_modules: Optional[frozenset[str]] = None) -> int:
    """Gives linear layers an Fp8LinearMethod (replacing the weights they were built with): every one
    when quantizing at load, else those whose every checkpoint projection is in `quantized_modules`
    (model/fp8_checkpoint.py); call it under the build's default dtype and device. Returns the count."""
    count = 0
    dtype = torch.get_default_dtype()
    for name, module in model.named_modules():
        if not isinstance(module, LinearBase):
            continue
        if quantized_modules is not None and not set(_checkpoint_modules(name)) <= quantized_modules:
            continue  # FP8 parts of a partly quantized fused layer are dequantized at load
        assert isinstance(module.weight, LoadableParameter)  # as built, before any method replaced it
        shard_ids = module.weight.shard_ids
        del module.weight
        module.quant_method = Fp8LinearMethod(config)
        try:
            module.quant_method.create_weights(module, module.input_size_per_partition,
                                               module.output_partition_sizes, dtype, module.weight_loader, shard_ids)
        except WeightShapeError as e:
            raise WeightShapeError(f"{name}: {e}") from None
        count += 1
    return count


def dequantized_weight(layer: LinearBase) -> torch.Tensor:
    """The fp32 weight an Fp8 layer computes with (tests, accuracy comparisons)."""
    return dequantize_weight(layer.weight, layer.weight_scale)
