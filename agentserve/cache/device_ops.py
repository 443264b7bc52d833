"""Device operations on KV pages that travel with a step: page copies and swaps.

The host decides them (the scheduler's copy-on-write, sessions' swap out / swap in) and queues them
on the scheduler (`Scheduler.queue_device_ops`); each step carries the ops queued since the last one
(`SchedulerOutput.device_ops`, in the order they were decided) and the model runner executes them
before the step's forward, on the step's stream. Under tensor parallelism every rank runs them on
its own shard of the pages, which a direct call from the host side would miss.

Ordering is what makes them safe, and is the same as when the host called the KV cache directly:
- a swap in (or page copy) is queued before the forward that reads its pages, on the same stream;
- a swapped-out or copied-from page freed on the host is rewritten only by later work on the same
  stream (a later step's forward, a later op in the list), so the copy reads it first;
- swap slots freed after a swap in are rewritten only by a later swap out in the list.
KVCache's swaps are asynchronous on CUDA (pinned host memory). Their gathers and scatters run on the
step's stream, so the order above holds for the pages; only the PCIe copy between a private staging
buffer and the swap slots runs on a copy stream (cache/swap_streams.py), which orders the slots itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, Sequence, Union

import torch


@dataclass(frozen=True)
class CopyBlocks:
    """Copy-on-write: page `dst` gets page `src`'s contents in every layer."""
    src: int
    dst: int


@dataclass(frozen=True)
class SwapOut:
    """Device pages `blocks[i]` go to CPU swap slots `slots[i]`."""
    blocks: tuple[int, ...]
    slots: tuple[int, ...]


@dataclass(frozen=True)
class SwapInStart:
    """A swap in's first half: CPU swap slots `slots[i]` start their copy back to the device, into a
    staging buffer named `ticket` (on CUDA over a copy stream, without holding up the step's stream)."""
    slots: tuple[int, ...]
    ticket: int


@dataclass(frozen=True)
class SwapInFinish:
    """The second half: the staged copy `ticket` goes into device pages `blocks` (blocks[i] gets the
    swap slot at position i of its SwapInStart), in the step's stream order."""
    blocks: tuple[int, ...]
    ticket: int


DeviceOp = Union[CopyBlocks, SwapOut, SwapInStart, SwapInFinish]


class PageStore(Protocol):
    """What executes the ops: cache/kv_cache.py's KVCache (the tests' fake pages too)."""

    def copy_blocks(self, pairs: Sequence[tuple[int, int]]) -> None: ...

    def swap_out(self, device_blocks: Sequence[int], swap_slots: Sequence[int]) -> None: ...

    def swap_in_start(self, swap_slots: Sequence[int], ticket: int) -> None: ...

    def swap_in_finish(self, device_blocks: Sequence[int], ticket: int) -> None: ...

    def swap_in_ready(self, ticket: int) -> bool:
        """Whether the copy of swap_in_start(ticket) has arrived (a finish would not wait for it)."""
        ...

    def step_launched(self, inputs_uploaded: Optional[torch.cuda.Event] = None) -> None:
        """A step's own uploads are queued (and done on the device once `inputs_uploaded` has
        happened): swap-in copies held back behind them may go now."""
        ...

    def no_step_launched(self) -> None:
        """The engine had nothing to launch: swap-in copies held back need not wait for one."""
        ...


def head_group(ops: Sequence[DeviceOp]) -> int:
    """How many ops from the head of `ops` run as one call: consecutive page copies go together (as one
    step's copy-on-write copies always did), any other op alone."""
    n = 1
    if isinstance(ops[0], CopyBlocks):
        while n < len(ops) and isinstance(ops[n], CopyBlocks):
            n += 1
    return n


def execute_device_ops(pages: PageStore, ops: list[DeviceOp]) -> None:
    """Runs `ops` in order and takes each off the list once it ran, so that a launch retried with the
    same list (Engine: a failed step relaunched without its newest requests) does not run them twice
    (a swap out repeated after the failed forward wrote into a reused page would copy the wrong KV).
    Consecutive page copies go in one call (head_group)."""
    while ops:
        head, n = ops[0], head_group(ops)
        if isinstance(head, CopyBlocks):
            pages.copy_blocks([(op.src, op.dst) for op in ops[:n] if isinstance(op, CopyBlocks)])
        elif isinstance(head, SwapOut):
            pages.swap_out(head.blocks, head.slots)
        elif isinstance(head, SwapInStart):
            pages.swap_in_start(head.slots, head.ticket)
        else:
            pages.swap_in_finish(head.blocks, head.ticket)
        del ops[:n]


class PageStores:
    """Several page stores addressed by the same page ids (the target's KV cache and a draft model's,
    spec/draft.py): every op runs on each of them, so pages move with all their layers."""

    def __init__(self, stores: Sequence[PageStore]) -> None:
        self.stores = list(stores)

    def copy_blocks(self, pairs: Sequence[tuple[int, int]]) -> None:
        for store in self.stores:
            store.copy_blocks(pairs)

    def swap_out(self, device_blocks: Sequence[int], swap_slots: Sequence[int]) -> None:
        for store in self.stores:
            store.swap_out(device_blocks, swap_slots)

    def swap_in_start(self, swap_slots: Sequence[int], ticket: int) -> None:
        for store in self.stores:
            store.swap_in_start(swap_slots, ticket)

    def swap_in_finish(self, device_blocks: Sequence[int], ticket: int) -> None:
        for store in self.stores:
            store.swap_in_finish(device_blocks, ticket)

    def swap_in_ready(self, ticket: int) -> bool:
        return all(store.swap_in_ready(ticket) for store in self.stores)

    def step_launched(self, inputs_uploaded: Optional[torch.cuda.Event] = None) -> None:
        for store in self.stores:
            store.step_launched(inputs_uploaded)

    def no_step_launched(self) -> None:
        for store in self.stores:
            store.no_step_launched()
