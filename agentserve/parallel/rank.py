"""A rank's part in tensor parallelism, as the model runner sees it (worker/model_runner.py).

Every rank builds the same ModelRunner with its TPShard, so that start-up work that involves the
model (loading, the profiling forward on CUDA) is collective and matched. Rank 0's runner also
sends each step to the others (driver.py); the other ranks' runners only receive (worker.py).
"""

from __future__ import annotations

from typing import Optional

import torch

from agentserve.cache.device_ops import DeviceOp
from agentserve.lora.manager import SlotTensors
from agentserve.model.attention import ForwardMetadata
from agentserve.model.llama import CausalLM
from agentserve.parallel.groups import ProcessGroups
from agentserve.parallel.shard import TPShard
from agentserve.worker.cuda_graph import DecodeGraphs


KVLayers = list[tuple[torch.Tensor, torch.Tensor]]


def shard_forward(model: CausalLM, kv_layers: KVLayers, input_ids: torch.Tensor, positions: torch.Tensor,
                  meta: ForwardMetadata, logits_indices: torch.Tensor,
                  graphs: Optional[DecodeGraphs] = None) -> Optional[torch.Tensor]:
    """One step's forward on this rank's shard, the same on every rank (so their collectives match):
    the layers, then the lm_head on the sampled rows (None when no row samples). Rank 0's result
    holds the whole vocabulary's logits; the others' are their slices, unused.

    With CUDA graphs (`graphs`, captured on every rank in the same order), a decode-only step whose
    batch has a captured size replays one: every rank decides from the same step inputs, so all pick
    the same padded size and context bucket, and replay the same collectives."""
    bs = meta.seq_lens.shape[0]
    if (graphs is not None and meta.max_query_len == 1 and logits_indices.shape[0] == bs
            and graphs.padded_size(bs) is not None):
        return graphs.run(input_ids, positions, meta.slot_mapping, meta.block_tables, meta.seq_lens,
                          meta.max_seq_len, meta.lora_slot_indices)
    hidden = model(input_ids, positions, kv_layers, meta)
    if logits_indices.numel() == 0:
        return None
    return model.compute_logits(hidden[logits_indices])


class TensorParallelError(RuntimeError):
    """A rank failed; the message names it."""


class TensorParallelRank:
    def __init__(self, groups: ProcessGroups) -> None:
        self.groups = groups
        self.shard: TPShard = groups.shard()
        # Set (on rank 0) once a rank has failed: the model cannot run without it, so the engine
        # reports itself unhealthy (AsyncEngine.is_running) and every later step fails.
        self.failure: Optional[TensorParallelError] = None

    def is_healthy(self) -> bool:
        """No rank has failed (rank 0's driver also looks at its workers' processes)."""
        return self.failure is None

    @property
    def is_driver(self) -> bool:
        return self.groups.rank == 0

    def agree_num_blocks(self, num_blocks: int) -> int:
        """The KV pool has the same page ids on every rank: each gets the fewest pages any rank can
        hold (rank 0 also holds a draft model's pages when speculating with one)."""
        return self.groups.min_over_ranks(num_blocks)

    def run_forward(self, model: CausalLM, kv_layers: KVLayers, input_ids: torch.Tensor, positions: torch.Tensor,
                    meta: ForwardMetadata, logits_indices: torch.Tensor,
                    graphs: Optional[DecodeGraphs] = None) -> Optional[torch.Tensor]:
        """Rank 0: sends the step's inputs to the other ranks and runs its own share (driver.py)."""
        raise AssertionError(f"rank {self.groups.rank} receives steps; only rank 0 sends them")

    def send_device_ops(self, ops: list[DeviceOp]) -> None:
        raise AssertionError(f"rank {self.groups.rank} receives steps; only rank 0 sends them")

    def send_lora_slot(self, slot: int, tensors: SlotTensors) -> None:
        """Rank 0: the other ranks load the adapter rank 0 loads into `slot` (lora/manager.py)."""
        raise AssertionError(f"rank {self.groups.rank} receives steps; only rank 0 sends them")

    def shutdown(self) -> None:
        """Rank 0 stops the other ranks; a worker rank leaves when told to (worker.py)."""
