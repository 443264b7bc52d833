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
- swap in: the host-to-device copy runs on `in_stream`, paced behind the steps' own uploads
  (swap_in_pacer.py: the copy engine serves all streams' uploads in issue order, so a step's inputs
  issued after a 1 GiB swap in waited ~20 ms for it), and the step's stream waits for it only at the
  scatter, just before the forward that reads the pages.
- the swap slots (pinned host memory) are the one thing both streams touch: each copy waits for
  the last copy of another stream that used any of its slots (a swap in reading slots that a swap
  out is still writing, a swap out reusing slots that a swap in is still reading).
- staged swap-out buffers still waiting for PCIe are bounded (`max_staged_bytes`): past it the host
  waits for the oldest copies, so a burst of evictions cannot eat the memory the KV pool left free.
  The bound is a quarter of the device memory free once the pool is allocated, between 1 and 4 GiB
  (`AGENTSERVE_SWAP_STAGING_GB` sets it): one 8k-token Llama-3.1-8B conversation is ~1 GiB, and a
  turn's admission often evicts several, so a 1 GiB bound made the host wait on PCIe (~20 ms a GiB)
  while the step's stream ran out of queued work. `bound_waits` / `bound_wait_ms` count those waits.

AGENTSERVE_SWAP_STREAMS=0 keeps every copy on the step's stream (the previous behaviour, for A/B).
"""

from __future__ import annotations

import os
import time
from collections import deque
from typing import Optional, Sequence

import torch

from agentserve.cache.swap_in_pacer import InCopy, SwapInPacer, chunk_bytes, chunked

SWAP_STREAMS: bool = os.environ.get("AGENTSERVE_SWAP_STREAMS", "1") == "1"
# Swap ins paced behind the steps' uploads (swap_in_pacer.py); 0 issues each at its start (for A/B).
SWAP_IN_PACING: bool = os.environ.get("AGENTSERVE_SWAP_IN_PACING", "1") == "1"
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
    def __init__(self, device: torch.device, pacing: Optional[bool] = None) -> None:
        self.device = device
        self.pacing = SWAP_IN_PACING if pacing is None else pacing
        self.pacer = SwapInPacer()
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
        slots = [slot for _, _, run in copies for slot in run]
        self._issue(self.pacer.through(slots=slots))  # a queued swap in still has to read these slots
        self._bound_staged(staged.nbytes)
        gathered = torch.cuda.Event()
        gathered.record()  # on the step's stream, after the gather
        self.out_stream.wait_event(gathered)
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

    def start_in(self, copies: Sequence[tuple[torch.Tensor, range]]) -> InCopy:
        """A copy of each (host rows (pinned), their slots), one after the other into one new device
        tensor (the InCopy's `staged`). Paced (swap_in_pacer.py): queued until a launched step's
        uploads are on their way (step_launched) or something needs it (finish_in, a swap out of its
        slots); unpaced: issued now. Nothing on the step's stream waits for it until finish_in."""
        first = copies[0][0]
        with torch.cuda.stream(self.in_stream):
            staged = torch.empty((sum(host.shape[0] for host, _ in copies), *first.shape[1:]), dtype=first.dtype,
                                 device=self.device)
        copy = InCopy(chunked(staged, copies), staged, frozenset(slot for _, run in copies for slot in run))
        self.pacer.queue(copy)
        if not self.pacing:
            self._issue(self.pacer.all())
        return copy

    def _issue(self, work: list[tuple[InCopy, int]], after: Optional[torch.cuda.Event] = None) -> None:
        """Issues each (copy, its next chunks) on the copy stream, oldest first, as one timed batch (after
        the event `after`, if given); a copy whose last chunk went gets its completion event (and marks
        its slots with it)."""
        if not work:
            return
        if after is not None:
            self.in_stream.wait_event(after)
        for copy, _ in work:
            if not copy.started:  # its slots' earlier copies (a swap out still writing them) go first
                self._after_slots(self.in_stream, sorted(copy.slots))
                copy.started = True
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        nbytes = 0
        # Inference mode: the staged tensor may have been allocated inside a step's (an inference tensor),
        # and an idle engine issues queued copies outside one, where an in-place copy into it is refused.
        with torch.inference_mode(), torch.cuda.stream(self.in_stream):
            start.record(self.in_stream)
            for copy, count in work:
                for _ in range(count):
                    chunk = copy.chunks.popleft()
                    chunk[0].copy_(chunk[1], non_blocking=True)
                    nbytes += chunk_bytes(chunk)
                if not copy.chunks:
                    done = torch.cuda.Event()
                    done.record(self.in_stream)
                    copy.done = done
                    self._mark(sorted(copy.slots), done)
            end.record(self.in_stream)
        self.pacer.batch_issued(start, end, nbytes)

    def step_launched(self, inputs_uploaded: Optional[torch.cuda.Event] = None) -> None:
        """A step's uploads are queued: the swap-in chunks due now follow them to the copy engine. The
        uploads wait on the step's stream for the previous forward, while the copy stream is free: a
        chunk issued after them in host order would still reach the engine first. So the chunks wait
        for `inputs_uploaded` (recorded on the step's stream after them) and run during the forward."""
        self._issue(self.pacer.due(), after=inputs_uploaded)

    def no_step_launched(self) -> None:
        """No step's uploads are coming (the engine has nothing to launch): every queued copy goes now."""
        self._issue(self.pacer.all())

    def finish_in(self, copy: InCopy) -> None:
        """The current stream may read `copy.staged` from here on (it waits for the copy at this point of
        its order, not the host; a no-op wait once the copy has arrived). A copy still queued is issued
        now, with every copy queued before it."""
        if not copy.issued:
            self._issue(self.pacer.through(copy=copy))
        assert copy.done is not None
        step_stream = torch.cuda.current_stream(self.device)
        step_stream.wait_event(copy.done)
        copy.staged.record_stream(step_stream)  # allocated on in_stream, read by the scatter on this one

    def synchronize(self) -> None:
        """Every copy started so far has finished (before the pinned swap space is dropped)."""
        self._issue(self.pacer.all())
        self.out_stream.synchronize()
        self.in_stream.synchronize()
        self._staged.clear()
        self.staged_bytes = 0
        self._slot_events.clear()
