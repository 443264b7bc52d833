"""What a model layer needs to know about tensor parallelism: this rank's place and collectives.

The model (model/llama.py) is built from a TPShard; at tensor-parallel size 1 it gets none and every
layer holds its whole weight. The collectives are plain callables so that the layers stay free of
torch.distributed (and of how the process group was made).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from agentserve.model.arch_config import ArchConfig, ModelLoadError

Collective = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TPShard:
    size: int
    rank: int
    all_reduce: Collective   # sums a tensor over the ranks (after row-parallel layers, the embedding)
    # The lm_head's logits: rank 0 gets the ranks' slices concatenated along the last dim (it alone
    # samples); the others keep their slice.
    gather_logits: Collective


def check_divisible(arch: ArchConfig, tp_size: int) -> None:
    """A clear error before any process starts: the Megatron split needs whole heads (and whole
    MLP columns) on every rank."""
    problems = []
    if arch.num_heads % tp_size:
        problems.append(f"num_attention_heads={arch.num_heads}")
    kv = arch.num_kv_heads
    if (kv % tp_size) if kv >= tp_size else (tp_size % kv):
        problems.append(f"num_key_value_heads={kv} (must divide by it, or divide it when fewer)")
    if arch.intermediate_size % tp_size:
        problems.append(f"intermediate_size={arch.intermediate_size}")
    if problems:
        raise ModelLoadError(f"tensor_parallel_size={tp_size} does not divide the model's "
                             f"{', '.join(problems)}; choose a size that divides them")


def max_over_ranks(tensor: torch.Tensor, all_reduce: Collective, size: int, rank: int) -> torch.Tensor:
    """The elementwise max of `tensor` over the ranks, through the sum the layers already hold: each
    rank fills its own row of a zero stack, so the sum is every rank's tensor, exactly (x + 0 == x).
    Start-up only (FP8 scales, KV scale calibration): every rank must call it at the same point."""
    stack = tensor.new_zeros((size, *tensor.shape))
    stack[rank] = tensor
    return all_reduce(stack).amax(dim=0)
