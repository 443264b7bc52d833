"""Swap copies on their own CUDA streams, so that moving a session's KV over PCIe stalls no step.

A swap is a device-side gather or scatter of pages (fast: device bandwidth) and a host <-> device
copy of the staged pages (slow: ~50 GB/s of PCIe, ~10 ms for a 4k-token Llama-3.1-8B conversation).
On the step's stream every request of every later step waited for that copy. Here the gather and
the scatter stay on the step's stream (so pages are read before any later forward rewrites them,
and written before any later forward reads them: the order cache/device_ops.py relies on), and only
the PCIe copy moves to a copy stream:

- swap out: the gathered pages are a private device buffer; its device-to-host copy runs on
  `out_stream` after an event of the step's stream. The pages themselves are free right away (the
  gather has read them in stream order); the buffer is kept alive for the copy by record_stream.
- swap in: the host-to-device copy runs on `in_stream` as soon as the op is issued (with async
  scheduling that is while the previous step's forward runs), and the step's stream waits for it
  only at the scatter, just before the forward that reads the pages.
- the swap slots (pinned host memory) are the one thing both streams touch: each copy waits for
  the last copy of another stream that used any of its slots (a swap in reading slots that a swap
  out is still writing, a swap out reusing slots that a swap in is still reading).
- staged swap-out buffers still waiting for PCIe are bounded (`max_staged_bytes`): past it the host
  waits for the oldest copies, so a burst of evictions cannot eat the memory the KV pool left free.
  The bound is a quarter of the device memory free once the pool is allocated, between 1 and 4 GiB
  (`AGENTSERVE_SWAP_STAGING_GB` sets it): one 8k-token Llama-3.1-8B conversation is ~1 GiB, and a
  turn's admission often evicts several, so a 1 GiB bound made the host wait on PCIe (~20 ms a GiB)
  while the step's stream ran out of queued work. `bound_waits` / `bound_wait_ms` count those waits.

The copy engine serves all streams' host-to-device copies in issue order, so a swap in's copy on
`in_stream` held back the next steps' own small input uploads until it was done (an H100 step of 13 ms
took 32-35 ms behind a 1 GiB swap in; pieces down to 8 MiB did not help; benchmarks/copy_contention.py).
Swap ins therefore read the pinned slots with a kernel (kernels/host_copy.py) on `in_stream`, which
leaves the copy engine to the steps; AGENTSERVE_SWAP_IN_COPY=engine keeps the copy engine (for A/B).
Swap outs stay on the copy engine: a device-to-host copy in flight did not slow a step.

AGENTSERVE_SWAP_STREAMS=0 keeps every copy on the step's stream (the previous behaviour, for A/B).
"""

from __future__ import annotations

import os
import time
from collections import deque
from typing import Optional, Sequence

import torch

from agentserve.kernels.host_copy import copy_from_host

SWAP_STREAMS: bool = os.environ.get("AGENTSERVE_SWAP_STREAMS", "1") == "1"
SWAP_IN_COPY: str = os.environ.get("AGENTSERVE_SWAP_IN_COPY", "kernel")
_STAGING_GB: Optional[str] = os.environ.get("AGENTSERVE_SWAP_STAGING_GB")
MIN_STAGED_BYTES = 1 << 30
MAX_STAGED_BYTES = 4 << 30


def staged_bytes_bound(device: torch.device) -> int:
    """The staged swap-out bytes allowed in flight: AGENTSERVE_SWAP_STAGING_GB, else a quarter of the
    device memory free now (after the KV pool), clamped to [1, 4] GiB."""
    if _STAGING_GB is not None:
        try:
            gib = float(_STAGING_GB)
        except ValueError:
            gib = -1.0
        if not gib > 0:
            raise ValueError(f"AGENTSERVE_SWAP_STAGING_GB={_STAGING_GB!r}: expected a number of GiB above 0")
        return max(1, int(gib * 2**30))
    free, _ = torch.cuda.mem_get_info(device)
    return min(max(free // 4, MIN_STAGED_BYTES), MAX_STAGED_BYTES)


class SwapStreams:
    def __init__(self, device: torch.device, swap_in_copy: Optional[str] = None) -> None:
        swap_in_copy = SWAP_IN_COPY if swap_in_copy is None else swap_in_copy
        if swap_in_copy not in ("kernel", "engine"):
            raise ValueError(f"AGENTSERVE_SWAP_IN_COPY={swap_in_copy!r}: expected 'kernel' or 'engine'")
        self.device = device
        self.swap_in_by_kernel = swap_in_copy == "kernel"
        self.out_stream = torch.cuda.Stream(device)
        self.in_stream = torch.cuda.Stream(device)
        # The last copy (either direction) that used each swap slot: its completion event.
        self._slot_events: dict[int, torch.cuda.Event] = {}
        # Swap-out copies in flight with the size of the device buffer each keeps alive, oldest first.
        self._staged: deque[tuple[torch.cuda.Event, int]] = deque()
        self.staged_bytes = 0
        self.max_staged_bytes = staged_bytes_bound(device)
        # The host's waits for staged copies at the bound (diagnostics: benchmarks/device_op_timer.py).
        self.bound_waits = 0
        self.bound_wait_ms = 0.0

    def _after_slots(self, stream: torch.cuda.Stream, slots: Sequence[int]) -> None:
        """`stream` waits for the last earlier copy of each slot (one wait per distinct copy)."""
        waited: set[int] = set()
        for slot in slots:
            event = self._slot_events.get(slot)
            if event is not None and id(event) not in waited:
                waited.add(id(event))
                stream.wait_event(event)

    def _mark(self, slots: Sequence[int], event: torch.cuda.Event) -> None:
        for slot in slots:
            self._slot_events[slot] = event

    def _bound_staged(self, nbytes: int) -> None:
        while self._staged and self._staged[0][0].query():  # finished copies release their buffers
            self.staged_bytes -= self._staged.popleft()[1]
        while self._staged and self.staged_bytes + nbytes > self.max_staged_bytes:
            event, size = self._staged.popleft()
            start = time.perf_counter()
            event.synchronize()
            self.bound_waits += 1
            self.bound_wait_ms += (time.perf_counter() - start) * 1e3
            self.staged_bytes -= size

    def copy_out(self, staged: torch.Tensor, copies: Sequence[tuple[torch.Tensor, torch.Tensor, range]]) -> None:
        """Each (device rows, host rows, their slots) of `copies`: the host rows (pinned) get the device
        rows, slices of `staged`, which the current stream has just produced."""
        self._bound_staged(staged.nbytes)
        gathered = torch.cuda.Event()
        gathered.record()  # on the step's stream, after the gather
        self.out_stream.wait_event(gathered)
        slots = [slot for _, _, run in copies for slot in run]
        self._after_slots(self.out_stream, slots)
        with torch.cuda.stream(self.out_stream):
            for rows, host, _ in copies:
                host.copy_(rows, non_blocking=True)
        staged.record_stream(self.out_stream)  # not reused by the allocator before the copy is done
        done = torch.cuda.Event()
        done.record(self.out_stream)
        self._mark(slots, done)
        self._staged.append((done, staged.nbytes))
        self.staged_bytes += staged.nbytes

    def start_in(self, copies: Sequence[tuple[torch.Tensor, range]]) -> tuple[torch.Tensor, torch.cuda.Event]:
        """Starts the device copy of each (host rows (pinned), their slots) on the copy stream, one after
        the other into one new device tensor: (the tensor, the copies' completion event). Nothing on the
        step's stream waits for it until finish_in."""
        slots = [slot for _, run in copies for slot in run]
        self._after_slots(self.in_stream, slots)
        first = copies[0][0]
        with torch.cuda.stream(self.in_stream):
            staged = torch.empty((sum(host.shape[0] for host, _ in copies), *first.shape[1:]), dtype=first.dtype,
                                 device=self.device)
            offset = 0
            for host, _ in copies:
                rows = staged[offset:offset + host.shape[0]]
                if self.swap_in_by_kernel and rows.nbytes % 4 == 0:  # whole 32-bit words (always for real heads)
                    copy_from_host(rows, host)  # the slots are pinned: the kernel reads them over PCIe
                else:
                    rows.copy_(host, non_blocking=True)
                offset += host.shape[0]
        done = torch.cuda.Event()
        done.record(self.in_stream)
        self._mark(slots, done)
        return staged, done

    def finish_in(self, staged: torch.Tensor, done: torch.cuda.Event) -> None:
        """The current stream may read `staged` from here on (it waits for the copy at this point of
        its order, not the host; a no-op wait once the copy has arrived)."""
        step_stream = torch.cuda.current_stream(self.device)
        step_stream.wait_event(done)
        staged.record_stream(step_stream)  # allocated on in_stream, read by the scatter on this one

    def synchronize(self) -> None:
        """Every copy issued so far has finished (before the pinned swap space is dropped)."""
        self.out_stream.synchronize()
        self.in_stream.synchronize()
        self._staged.clear()
        self.staged_bytes = 0
        self._slot_events.clear()
