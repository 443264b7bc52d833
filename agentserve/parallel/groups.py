"""The process groups of one tensor-parallel engine, made straight from a TCPStore.

Two groups: `control` (gloo, CPU tensors: step headers and small host values) and `device` (NCCL on
CUDA, the same gloo group on CPU: activations and the step's flat tensors). They are made from the
store rather than through init_process_group, so no process-wide default group exists: several
engines may come and go in one process (the tests build many), each with its own groups.
"""

from __future__ import annotations

import datetime
import os
from typing import Protocol, cast

import torch
import torch.distributed as dist

from agentserve.parallel.shard import TPShard

# A collective waits this long for a rank that neither answers nor exits (an exited rank's closed
# sockets fail the collective at once); the start-up rendezvous waits as long for every rank.
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=600)


class CollectiveError(RuntimeError):
    """A collective over the ranks failed: in practice a peer has exited (its closed sockets end the
    collective at once), so the caller waits for it to exit and names it."""


class CollectiveBackend(Protocol):
    """The collectives a gloo or NCCL backend runs (pybind exposes them on torch's Backend objects; its type
    stubs leave them out, so the groups are typed by this protocol)."""

    def allreduce(self, tensors: list[torch.Tensor], opts: dist.AllreduceOptions = ...) -> dist.Work: ...

    def gather(self, output: list[list[torch.Tensor]], inputs: list[torch.Tensor],
               opts: dist.GatherOptions = ...) -> dist.Work: ...

    def broadcast(self, tensors: list[torch.Tensor], opts: dist.BroadcastOptions = ...) -> dist.Work: ...


def _complete(work: dist.Work) -> None:
    try:
        work.wait()
    except RuntimeError as e:
        raise CollectiveError(str(e)) from e


def disable_nvls() -> None:
    """NCCL's NVLink multicast (NVLS) is kept off in every process of the engine: it reserves device
    memory per communicator and has hung on the lent H200 machines (KINDS.md)."""
    os.environ["NCCL_NVLS_ENABLE"] = "0"


class ProcessGroups:
    def __init__(self, store: dist.Store, rank: int, size: int, device: torch.device) -> None:
        self.rank, self.size, self.device = rank, size, device
        self.control = cast(CollectiveBackend, dist.ProcessGroupGloo(
            dist.PrefixStore("control", store), rank, size, COLLECTIVE_TIMEOUT))
        self.device_group: CollectiveBackend
        if device.type == "cuda":
            disable_nvls()
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = COLLECTIVE_TIMEOUT
            self.device_group = cast(CollectiveBackend, dist.ProcessGroupNCCL(
                dist.PrefixStore("device", store), rank, size, options))
        else:
            self.device_group = self.control

    # --- collectives --------------------------------------------------------------------------------
    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        _complete(self.device_group.allreduce([tensor]))
        return tensor

    def gather_to_first(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0 gets the ranks' tensors concatenated along the last dim (the lm_head's logits:
        only rank 0 samples); the other ranks get their own tensor back."""
        tensor = tensor.contiguous()
        opts = dist.GatherOptions()
        opts.rootRank = 0
        if self.rank != 0:
            _complete(self.device_group.gather([], [tensor], opts))
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        _complete(self.device_group.gather([parts], [tensor], opts))
        return torch.cat(parts, dim=-1)

    def broadcast(self, tensor: torch.Tensor, control: bool = False) -> None:
        """From rank 0 into `tensor` on every other rank."""
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        group = self.control if control else self.device_group
        _complete(group.broadcast([tensor], opts))

    def min_over_ranks(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp(dist.ReduceOp.MIN)
        _complete(self.control.allreduce([t], opts))
        return int(t.item())

    def shard(self) -> TPShard:
        return TPShard(self.size, self.rank, self.all_reduce, self.gather_to_first)
