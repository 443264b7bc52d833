"""Linear layers split the Megatron way, with weight loaders and a quant_method slot.

Tensor parallelism shards a layer across `tp_size` ranks; this rank is `tp_rank`. The engine runs
one rank today (tp_size 1: every layer holds its whole weight and the communication hooks are
never called), but the sharding math is here so that tensor parallelism only has to pass the
process group's size, rank and collectives:

- ColumnParallelLinear: W [out, in] split along out; each rank computes its slice of the outputs.
- MergedColumnParallelLinear: several column-parallel outputs fused in one weight (gate_up_proj);
  each is split separately, so rank r holds [gate_r; up_r].
- QKVParallelLinear: q, k, v fused and split by heads; when there are fewer KV heads than ranks,
  each KV head is replicated on tp_size / num_kv_heads ranks.
- RowParallelLinear: W split along in (its input is a column-parallel layer's output slice); the
  partial products are summed by an all-reduce; the bias is added once, on rank 0, before it.
- ReplicatedLinear: every rank holds the whole weight.

Each weight parameter is a LoadableParameter whose `weight_loader(param, loaded_weight, shard_id)`
takes a whole checkpoint tensor (q_proj, gate_proj, ...) and copies this rank's slice of it into
this rank's slice of the fused parameter. Forward goes through `quant_method.apply`
(UnquantizedLinearMethod by default: the Triton GEMV at M == 1 on CUDA, else F.linear).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from agentserve.model.parameter import LoadableParameter, ShardId, WeightShapeError, copy_checked
from agentserve.model.quant import LinearMethodBase, UnquantizedLinearMethod

AllReduce = Callable[[torch.Tensor], torch.Tensor]


def divide(numerator: int, denominator: int) -> int:
    if numerator % denominator:
        raise ValueError(f"{numerator} is not divisible by the tensor-parallel size {denominator}")
    return numerator // denominator


class LinearBase(nn.Module):
    """Holds the partition sizes and the quant method; subclasses define the weight loader."""

    # Parameters the quant method registers (create_weights, process_weights_after_loading), declared
    # for the type checker (nn.Module.__getattr__ types them as Tensor | Module): every method's
    # `weight`; Fp8LinearMethod's `weight_scale` and, with static activation scales, `input_scale`.
    weight: nn.Parameter
    weight_scale: nn.Parameter
    input_scale: nn.Parameter

    def __init__(self, input_size_per_partition: int, output_partition_sizes: list[int], bias: bool,
                 quant_method: Optional[LinearMethodBase], tp_size: int, tp_rank: int,
                 shard_ids: tuple[Optional[ShardId], ...] = (None,), shard_bias: bool = True) -> None:
        super().__init__()
        if not 0 <= tp_rank < tp_size:
            raise ValueError(f"tp_rank {tp_rank} is outside [0, {tp_size})")
        self.tp_size, self.tp_rank = tp_size, tp_rank
        self.input_size_per_partition = input_size_per_partition
        self.output_partition_sizes = output_partition_sizes
        self.output_size_per_partition = sum(output_partition_sizes)
        self.quant_method: LinearMethodBase = quant_method if quant_method is not None else UnquantizedLinearMethod()
        dtype = torch.get_default_dtype()
        self.quant_method.create_weights(self, input_size_per_partition, output_partition_sizes, dtype,
                                         self.weight_loader, shard_ids)
        self.bias: Optional[LoadableParameter]
        if bias:
            # A column-parallel bias is split like the outputs; a row-parallel one is whole.
            self.bias = LoadableParameter(torch.empty(self.output_size_per_partition, dtype=dtype), self.weight_loader,
                                          output_dim=0 if shard_bias else None, shard_ids=shard_ids)
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: LoadableParameter, loaded_weight: torch.Tensor,
                      shard_id: Optional[ShardId] = None) -> None:
        raise NotImplementedError

    def output_shard(self, shard_id: Optional[ShardId] = None) -> tuple[int, int]:
        """(which slice, of how many) of the checkpoint's output rows of `shard_id` this rank holds:
        (0, 1) where the outputs are not split. Things sharded with the weight's rows (FP8 block
        scales) cut their slice with it."""
        return 0, 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x, self.bias)


class ReplicatedLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 quant_method: Optional[LinearMethodBase] = None) -> None:
        super().__init__(input_size, [output_size], bias, quant_method, tp_size=1, tp_rank=0)

    def weight_loader(self, param: LoadableParameter, loaded_weight: torch.Tensor,
                      shard_id: Optional[ShardId] = None) -> None:
        assert shard_id is None, "a replicated layer has no shards"
        copy_checked(param.data, loaded_weight)


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks; the output stays split (the next row-parallel layer
    takes it as its input slice)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 quant_method: Optional[LinearMethodBase] = None, tp_size: int = 1, tp_rank: int = 0,
                 output_sizes: Optional[list[int]] = None, shard_ids: tuple[Optional[ShardId], ...] = (None,)) -> None:
        partition_sizes = [divide(s, tp_size) for s in (output_sizes or [output_size])]
        super().__init__(input_size, partition_sizes, bias, quant_method, tp_size, tp_rank, shard_ids)

    def weight_loader(self, param: LoadableParameter, loaded_weight: torch.Tensor,
                      shard_id: Optional[ShardId] = None) -> None:
        assert shard_id is None, "a plain column-parallel layer has no shards"
        self._load_rows(param, loaded_weight, 0, self.output_size_per_partition, self.tp_rank, self.tp_size)

    def output_shard(self, shard_id: Optional[ShardId] = None) -> tuple[int, int]:
        return self.tp_rank, self.tp_size

    @staticmethod
    def _load_rows(param: LoadableParameter, loaded_weight: torch.Tensor, offset: int, size: int,
                   shard_rank: int, num_shards: int) -> None:
        """The checkpoint tensor holds `num_shards` slices of `size` rows (along the output dim);
        slice `shard_rank` goes to rows [offset, offset + size) of the parameter."""
        if param.output_dim is None:  # not split: every rank holds all of it
            copy_checked(param.data, loaded_weight)
            return
        dim = param.output_dim
        if loaded_weight.dim() <= dim or loaded_weight.shape[dim] != size * num_shards:
            raise WeightShapeError(f"has shape {tuple(loaded_weight.shape)}, the config implies "
                                   f"{size * num_shards} rows along dim {dim}")
        copy_checked(param.data.narrow(dim, offset, size), loaded_weight.narrow(dim, shard_rank * size, size))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input fused into one weight (gate and up:
    shard ids 0 and 1); rank r holds the r-th slice of each, concatenated."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False,
                 quant_method: Optional[LinearMethodBase] = None, tp_size: int = 1, tp_rank: int = 0) -> None:
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), bias, quant_method, tp_size, tp_rank,
                         output_sizes=output_sizes, shard_ids=tuple(range(len(output_sizes))))

    def weight_loader(self, param: LoadableParameter, loaded_weight: torch.Tensor,
                      shard_id: Optional[ShardId] = None) -> None:
        if shard_id is None:  # a checkpoint that already fuses them: split it and load each part
            if param.output_dim is None:
                copy_checked(param.data, loaded_weight)
                return
            for i, part in enumerate(loaded_weight.split(self.output_sizes, dim=param.output_dim)):
                self.weight_loader(param, part, i)
            return
        assert isinstance(shard_id, int) and 0 <= shard_id < len(self.output_sizes), f"bad shard id {shard_id!r}"
        sizes = self.output_partition_sizes
        self._load_rows(param, loaded_weight, sum(sizes[:shard_id]), sizes[shard_id], self.tp_rank, self.tp_size)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections fused (shard ids "q", "k", "v") and split by attention heads."""

    def __init__(self, hidden_size: int, head_size: int, total_num_heads: int, total_num_kv_heads: int,
                 bias: bool = False, quant_method: Optional[LinearMethodBase] = None, tp_size: int = 1,
                 tp_rank: int = 0) -> None:
        self.head_size = head_size
        self.total_num_heads, self.total_num_kv_heads = total_num_heads, total_num_kv_heads
        self.num_heads = divide(total_num_heads, tp_size)
        if tp_size >= total_num_kv_heads:
            # Fewer KV heads than ranks: each rank holds one KV head, shared by tp_size / kv ranks.
            self.num_kv_heads = 1
            self.num_kv_head_replicas = divide(tp_size, total_num_kv_heads)
        else:
            self.num_kv_heads = divide(total_num_kv_heads, tp_size)
            self.num_kv_head_replicas = 1
        q_size, kv_size = self.num_heads * head_size, self.num_kv_heads * head_size
        self.shard_offsets: dict[ShardId, tuple[int, int]] = {
            "q": (0, q_size), "k": (q_size, kv_size), "v": (q_size + kv_size, kv_size)}
        # ColumnParallelLinear divides output sizes by tp_size; pass the per-rank sizes times tp_size.
        super().__init__(hidden_size, 0, bias, quant_method, tp_size, tp_rank,
                         output_sizes=[q_size * tp_size, kv_size * tp_size, kv_size * tp_size],
                         shard_ids=("q", "k", "v"))

    def weight_loader(self, param: LoadableParameter, loaded_weight: torch.Tensor,
                      shard_id: Optional[ShardId] = None) -> None:
        if shard_id is None:  # a checkpoint with a fused qkv tensor: split it and load each part
            if param.output_dim is None:
                copy_checked(param.data, loaded_weight)
                return
            total = [self.total_num_heads * self.head_size] + [self.total_num_kv_heads * self.head_size] * 2
            for sid, part in zip(("q", "k", "v"), loaded_weight.split(total, dim=param.output_dim)):
                self.weight_loader(param, part, sid)
            return
        assert shard_id in self.shard_offsets, f"bad shard id {shard_id!r} (expected q, k or v)"
        offset, size = self.shard_offsets[shard_id]
        self._load_rows(param, loaded_weight, offset, size, *self.output_shard(shard_id))

    def output_shard(self, shard_id: Optional[ShardId] = None) -> tuple[int, int]:
        if shard_id in ("k", "v"):
            # KV heads replicated over several ranks: ranks r*replicas .. (r+1)*replicas-1 hold slice r.
            return self.tp_rank // self.num_kv_head_replicas, self.tp_size // self.num_kv_head_replicas
        return self.tp_rank, self.tp_size


class RowParallelLinear(LinearBase):
    """Input features split across ranks; `all_reduce` sums the partial outputs (required when
    tp_size > 1; at tp_size 1 there is nothing to sum)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 quant_method: Optional[LinearMethodBase] = None, tp_size: int = 1, tp_rank: int = 0,
                 all_reduce: Optional[AllReduce] = None) -> None:
        if tp_size > 1 and all_reduce is None:
            raise ValueError("a row-parallel layer with tp_size > 1 needs an all_reduce")
        self.all_reduce = all_reduce
        super().__init__(divide(input_size, tp_size), [output_size], bias, quant_method, tp_size, tp_rank,
                         shard_bias=False)

    def weight_loader(self, param: LoadableParameter, loaded_weight: torch.Tensor,
                      shard_id: Optional[ShardId] = None) -> None:
        assert shard_id is None, "a row-parallel layer has no shards"
        if param.input_dim is None:  # the bias: whole on every rank
            copy_checked(param.data, loaded_weight)
            return
        dim, size = param.input_dim, self.input_size_per_partition
        if loaded_weight.dim() <= dim or loaded_weight.shape[dim] != size * self.tp_size:
            raise WeightShapeError(f"has shape {tuple(loaded_weight.shape)}, the config implies "
                                   f"{size * self.tp_size} columns along dim {dim}")
        copy_checked(param.data, loaded_weight.narrow(dim, self.tp_rank * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.forward_partial(x)
        return out if self.all_reduce is None else self.all_reduce(out)

    @property
    def partial_bias(self) -> Optional[torch.Tensor]:
        """The bias this rank adds to its share: it joins the sum once (rank 0), not tp_size times."""
        return self.bias if self.tp_rank == 0 else None

    def forward_partial(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's share of the output, before the sum over ranks (a LoRA layer adds its own
        share of the adapter's delta to it: lora/layers.py)."""
        return self.quant_method.apply(self, x, self.partial_bias)
