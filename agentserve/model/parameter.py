"""Model parameters that know how to load themselves from checkpoint tensors.

Every parameter of the model is a LoadableParameter: it carries the `weight_loader(param,
loaded_weight, shard_id=None)` of the layer that owns it (vLLM's contract), so the checkpoint
loader never needs to know how a layer fuses or shards its weights. A fused parameter (qkv_proj,
gate_up_proj) is filled from several checkpoint tensors, one per shard id; `shard_ids` names them
so the loader can report what a checkpoint lacks.
"""

from __future__ import annotations

from typing import Optional, Protocol, Union

import torch
from torch import nn

ShardId = Union[int, str]  # "q" / "k" / "v" for QKV, 0..n-1 for merged column-parallel layers


class WeightShapeError(ValueError):
    """A checkpoint tensor does not fit the slice of the parameter it is meant for."""


class WeightLoader(Protocol):
    def __call__(self, param: "LoadableParameter", loaded_weight: torch.Tensor,
                 shard_id: Optional[ShardId] = None) -> None: ...


class LoadableParameter(nn.Parameter):
    """An nn.Parameter (never trained: requires_grad is False) with its weight loader and layout:
    `output_dim` / `input_dim` name the dimensions that tensor parallelism shards (None: not
    sharded along that role)."""

    weight_loader: WeightLoader
    output_dim: Optional[int]
    input_dim: Optional[int]
    shard_ids: tuple[Optional[ShardId], ...]

    def __new__(cls, data: torch.Tensor, weight_loader: WeightLoader, *, output_dim: Optional[int] = None,
                input_dim: Optional[int] = None,
                shard_ids: tuple[Optional[ShardId], ...] = (None,)) -> "LoadableParameter":
        return super().__new__(cls, data, requires_grad=False)

    def __init__(self, data: torch.Tensor, weight_loader: WeightLoader, *, output_dim: Optional[int] = None,
                 input_dim: Optional[int] = None, shard_ids: tuple[Optional[ShardId], ...] = (None,)) -> None:
        self.weight_loader = weight_loader
        self.output_dim = output_dim
        self.input_dim = input_dim
        self.shard_ids = shard_ids


def copy_checked(target: torch.Tensor, loaded_weight: torch.Tensor) -> None:
    if tuple(loaded_weight.shape) != tuple(target.shape):
        raise WeightShapeError(f"has shape {tuple(loaded_weight.shape)}, the config implies {tuple(target.shape)}")
    target.copy_(loaded_weight.to(target.dtype))


def default_weight_loader(param: LoadableParameter, loaded_weight: torch.Tensor,
                          shard_id: Optional[ShardId] = None) -> None:
    """Whole tensor into a whole (replicated) parameter."""
    assert shard_id is None, f"a replicated parameter has no shards (got {shard_id!r})"
    copy_checked(param.data, loaded_weight)
