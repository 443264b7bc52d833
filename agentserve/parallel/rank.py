"""A rank's part in tensor parallelism, as the model runner sees it (worker/model_runner.py).

Every rank builds the same ModelRunner with its TPShard, so that start-up work that involves the
model (loading, the profiling forward on CUDA) is collective and matched. Rank 0's runner also
sends each step to the others (driver.py); the other ranks' runners only receive (worker.py).
"""

from __future__ import annotations

from typing import Optional

import torch

from agentserve.cache.device_ops import DeviceOp
from agentserve.model.attention import ForwardMetadata
from agentserve.parallel.groups import ProcessGroups
from agentserve.parallel.shard import TPShard


class TensorParallelError(RuntimeError):
    """A rank failed; the message names it."""


class TensorParallelRank:
    def __init__(self, groups: ProcessGroups) -> None:
        self.groups = groups
        self.shard: TPShard = groups.shard()
        # Set (on rank 0) once a rank has failed: the model cannot run without it, so the engine
        # reports itself unhealthy (AsyncEngine.is_running) and every later step fails.
        self.failure: Optional[TensorParallelError] = None

    @property
    def is_driver(self) -> bool:
        return self.groups.rank == 0

    def agree_num_blocks(self, num_blocks: int) -> int:
        """The KV pool has the same page ids on every rank: each gets the fewest pages any rank can
        hold (rank 0 also holds a draft model's pages when speculating with one)."""
        return self.groups.min_over_ranks(num_blocks)

    def send_forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: ForwardMetadata,
                     logits_indices: torch.Tensor) -> None:
        raise AssertionError(f"rank {self.groups.rank} receives steps; only rank 0 sends them")

    def send_device_ops(self, ops: list[DeviceOp]) -> None:
        raise AssertionError(f"rank {self.groups.rank} receives steps; only rank 0 sends them")

    def shutdown(self) -> None:
        """Rank 0 stops the other ranks; a worker rank leaves when told to (worker.py)."""
