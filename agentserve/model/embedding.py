"""Vocabulary-parallel token embedding and lm_head.

Under tensor parallelism each rank holds a contiguous slice of the vocabulary rows (the last slice
padded with zero rows when the vocabulary does not divide evenly). The embedding looks up the ids
that fall in its slice, writes zeros for the others, and an all-reduce sums the slices; the lm_head
computes logits for its slice and an all-gather concatenates them. At tp_size 1 the slice is the
whole vocabulary and neither collective runs.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from agentserve.model.linear import AllReduce
from agentserve.model.parameter import LoadableParameter, ShardId, WeightShapeError, copy_checked
from agentserve.model.quant import LinearMethodBase, UnquantizedLinearMethod

# Concatenates the ranks' tensors along the last dim: on the rank that samples at least (parallel/
# gathers the logits to rank 0 only; the other ranks get their own slice back, unused).
AllGather = Callable[[torch.Tensor], torch.Tensor]


class VocabParallelWeight(nn.Module):
    """This rank's rows of a [vocab, hidden] weight, and their loader (shared by the embedding and
    the lm_head, so a tied model points both at one parameter)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, tp_size: int, tp_rank: int) -> None:
        super().__init__()
        if not 0 <= tp_rank < tp_size:
            raise ValueError(f"tp_rank {tp_rank} is outside [0, {tp_size})")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.tp_size, self.tp_rank = tp_size, tp_rank
        self.rows_per_partition = -(-num_embeddings // tp_size)
        self.vocab_start = tp_rank * self.rows_per_partition
        # rows of the real vocabulary on this rank (the rest of the partition is padding)
        self.vocab_end = min(self.vocab_start + self.rows_per_partition, num_embeddings)
        weight = torch.empty(self.rows_per_partition, embedding_dim, dtype=torch.get_default_dtype())
        self.weight = LoadableParameter(weight, self.weight_loader, output_dim=0, input_dim=1)

    def weight_loader(self, param: LoadableParameter, loaded_weight: torch.Tensor,
                      shard_id: Optional[ShardId] = None) -> None:
        assert shard_id is None, "an embedding has no shards"
        if tuple(loaded_weight.shape) != (self.num_embeddings, self.embedding_dim):
            raise WeightShapeError(f"has shape {tuple(loaded_weight.shape)}, the config implies "
                                   f"{(self.num_embeddings, self.embedding_dim)}")
        rows = self.vocab_end - self.vocab_start
        copy_checked(param.data[:rows], loaded_weight[self.vocab_start:self.vocab_end])
        param.data[rows:].zero_()


class VocabParallelEmbedding(VocabParallelWeight):
    def __init__(self, num_embeddings: int, embedding_dim: int, tp_size: int = 1, tp_rank: int = 0,
                 all_reduce: Optional[AllReduce] = None) -> None:
        if tp_size > 1 and all_reduce is None:
            raise ValueError("a vocab-parallel embedding with tp_size > 1 needs an all_reduce")
        super().__init__(num_embeddings, embedding_dim, tp_size, tp_rank)
        self.all_reduce = all_reduce
        # Set for a draft with fewer rows than its target's vocabulary (spec/draft_vocab.py): the target
        # may emit a padding id past them, looked up here in the last row instead of out of bounds.
        self.max_id: Optional[int] = None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.max_id is not None:
            input_ids = input_ids.clamp(max=self.max_id)
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        in_slice = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        local = torch.where(in_slice, input_ids - self.vocab_start, 0)
        out = F.embedding(local, self.weight) * in_slice.unsqueeze(-1).to(self.weight.dtype)
        assert self.all_reduce is not None
        return self.all_reduce(out)


class ParallelLMHead(VocabParallelWeight):
    """The output projection over this rank's vocabulary slice."""

    def __init__(self, num_embeddings: int, embedding_dim: int, tp_size: int = 1, tp_rank: int = 0,
                 all_gather: Optional[AllGather] = None) -> None:
        if tp_size > 1 and all_gather is None:
            raise ValueError("a vocab-parallel lm_head with tp_size > 1 needs an all_gather")
        super().__init__(num_embeddings, embedding_dim, tp_size, tp_rank)
        self.all_gather = all_gather
        # The Triton GEMV at M == 1 on CUDA, as before; a draft model's may be FP8 (model/fp8_lm_head.py).
        self.quant_method: LinearMethodBase = UnquantizedLinearMethod()
        # The logits' width: the vocabulary, or a draft's target's when their tables are padded to other
        # sizes (spec/draft_vocab.py); columns past this table's rows are -inf (never chosen).
        self.num_logits = num_embeddings

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.quant_method.apply(self, hidden)
        if self.all_gather is not None:
            logits = self.all_gather(logits)
        # Drop the padding rows of the last slice (and a draft's rows past its target's vocabulary).
        logits = logits[..., :min(self.num_embeddings, self.num_logits)]
        if self.num_logits > self.num_embeddings:
            logits = F.pad(logits, (0, self.num_logits - self.num_embeddings), value=float("-inf"))
        return logits
