"""FP8 weight scales under tensor parallelism: each rank's scales are cut like its weight shard, and
the scales it computes itself come out as at tensor-parallel size 1.

- Per-channel scales belong to output rows: a column-parallel layer holds the scales of its rows
  (model/linear.py's loaders cut them with the weight), a row-parallel layer holds every output's.
  Where the scale is computed here (a 16-bit checkpoint quantized at load, or block scales turned
  into channel scales), a row-parallel rank sees only its columns of each row: the row's largest
  magnitude is the max over the ranks, so every rank quantizes with the one-rank scale.
- Per-tensor scales are one number per checkpoint projection: every rank holds them all.
- 128x128 block scales are cut by whole blocks: by block rows for a column-parallel layer (per q / k
  / v or gate / up slice), by block columns for a row-parallel one. A split that falls inside a block
  would need a block shared by two ranks; it is refused when the layer is built.

Activations are another matter: on CUDA, batches above the GEMV's quantize x per token (W8A8), and a
row-parallel rank does so over its own columns of x, as vLLM does; those steps round slightly
differently from one rank. The CPU reference (and the batch-1 GEMV) leave x unquantized, so there
tensor parallelism reproduces one rank's FP8 outputs.
"""

from __future__ import annotations

from typing import Optional

import torch

from agentserve.kernels.fp8_linear import MIN_SCALE, quantize_weight_per_channel
from agentserve.kernels.fp8_utils import FP8_MAX, to_fp8_saturated
from agentserve.model.linear import LinearBase, RowParallelLinear
from agentserve.model.parameter import ShardId, WeightShapeError
from agentserve.parallel.shard import max_over_ranks


def quantize_per_channel(layer: LinearBase, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 weight, fp32 scale [N]) of this rank's weight, with the scales of the whole rows."""
    if not (isinstance(layer, RowParallelLinear) and layer.all_reduce is not None):
        return quantize_weight_per_channel(weight)  # whole rows here
    w = weight.float()
    amax = max_over_ranks(w.abs().amax(dim=1), layer.all_reduce, layer.tp_size, layer.tp_rank)
    scale = (amax / FP8_MAX).clamp(min=MIN_SCALE)  # quantize_weight_per_channel's formula
    return to_fp8_saturated(w / scale[:, None]), scale


def check_block_split(layer: LinearBase, shard_ids: tuple[Optional[ShardId], ...], block: tuple[int, int]) -> None:
    """Refuses a tensor-parallel split of `layer` that does not fall on the scale blocks."""
    if layer.tp_size == 1:
        return
    bn, bk = block
    if isinstance(layer, RowParallelLinear):
        k = layer.input_size_per_partition
        if k % bk:
            raise WeightShapeError(f"tensor_parallel_size={layer.tp_size} gives each rank {k} of its "
                                   f"{k * layer.tp_size} input columns, not a multiple of the {bk}-column FP8 "
                                   "scale blocks; choose a tensor_parallel_size that splits on block boundaries")
        return
    for size, shard_id in zip(layer.output_partition_sizes, shard_ids):
        count = layer.output_shard(shard_id)[1]
        if count > 1 and size % bn:
            part = f" ({shard_id})" if shard_id is not None else ""
            raise WeightShapeError(f"tensor_parallel_size={layer.tp_size} gives each rank {size} of the "
                                   f"{size * count} output rows{part}, not a multiple of the {bn}-row FP8 scale "
                                   "blocks; choose a tensor_parallel_size that splits on block boundaries")


def rank_block_scales(layer: LinearBase, loaded: torch.Tensor, shard_id: Optional[ShardId], block_rows: int,
                      block_k: int) -> torch.Tensor:
    """This rank's blocks of a checkpoint projection's block scales (`block_rows` rows of them)."""
    index, count = layer.output_shard(shard_id)
    loaded = _narrow(loaded, 0, index, count, block_rows)
    if isinstance(layer, RowParallelLinear) and layer.tp_size > 1:
        loaded = _narrow(loaded, 1, layer.tp_rank, layer.tp_size, layer.input_size_per_partition // block_k)
    return loaded


def _narrow(loaded: torch.Tensor, dim: int, index: int, count: int, blocks: int) -> torch.Tensor:
    if count == 1:
        return loaded
    if loaded.dim() != 2 or loaded.shape[dim] != blocks * count:
        raise WeightShapeError(f"has shape {tuple(loaded.shape)}, the config implies {blocks * count} scale "
                               f"blocks along dim {dim}")
    return loaded.narrow(dim, index * blocks, blocks)
