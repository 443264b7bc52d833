"""When a swap in's host-to-device copy goes to the copy engine: after a step's own uploads, and no more
of it than the engine moves before the next step's uploads come.

The copy engine serves every stream's host-to-device copies in the order they were issued. A step's few
KB of inputs (token ids, positions, block tables, sampling parameters) issued behind a 1 GiB swap in
waited for the whole of it (~20 ms at ~50 GB/s), and the forward with them: on an H100 a 13 ms step took
32-35 ms, whether the swap was one copy or pieces of 256 MiB down to 8 MiB (1 MiB pieces: 26 ms);
a device-to-host copy in flight did not slow it (benchmarks/copy_contention.py; the sessions' decode
steps that carried swap ins took 24-27 ms against 12-13 ms for the others). A kernel reading the pinned
slots instead of the copy engine cost the step as much (its resident programs slow the GEMVs).

So a started swap in is queued on the host (`InCopy`), and the model runner calls `due()` once per
launched step, after the step's uploads are queued: it hands out chunks of the queued copies, oldest
first, up to what the engine moves in most of one step at the measured rate; they wait on the copy
stream for an event after the step's uploads (an upload waits on the step's stream for the previous
forward while the copy stream is free: host order alone would put the chunks first). A copy
the step's stream needs (a finish), or whose slots a swap out is about to reuse, is issued at once by
the caller with everything queued before it (`through`), so pacing never reorders slot use and never
makes a finish wait for the host.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

# The rate assumed until a batch of copies has been timed (PCIe 4 x16 pinned: ~25 GB/s; PCIe 5: ~50).
INITIAL_BYTES_PER_S = 25e9
# Of a step period, the share the engine may spend on swap ins before the next step's uploads arrive.
PERIOD_SHARE = 0.7
# The longest period counted (a first step after idle time would hand out everything queued).
MAX_PERIOD_S = 0.1
# Periods whose median bounds the one counted (a few steps: decode steps are the common, short case).
PERIODS_KEPT = 8
# Bytes per copy: the pacing's grain (~0.6 ms of PCIe 5), small enough to fill a step's budget closely.
CHUNK_BYTES = 32 << 20


def chunked(staged: torch.Tensor, copies: Sequence[tuple[torch.Tensor, range]],
            chunk_bytes: int = CHUNK_BYTES) -> deque[tuple[torch.Tensor, torch.Tensor]]:
    """(device rows, host rows) pairs of at most chunk_bytes (at least one row) covering each host run
    of `copies` into consecutive rows of `staged`."""
    out: deque[tuple[torch.Tensor, torch.Tensor]] = deque()
    offset = 0
    for host, _ in copies:
        n = host.shape[0]
        per = max(1, chunk_bytes // max(1, host[0].numel() * host.element_size())) if n else 1
        for i in range(0, n, per):
            rows = min(per, n - i)
            out.append((staged[offset + i:offset + i + rows], host[i:i + rows]))
        offset += n
    return out


@dataclass(eq=False)  # identity: two copies of the same sizes are different copies
class InCopy:
    """A swap in's copy, host rows (pinned) into one staged device tensor, in chunks not yet issued."""

    chunks: deque[tuple[torch.Tensor, torch.Tensor]]
    staged: torch.Tensor
    slots: frozenset[int]
    started: bool = False  # its first chunk was issued (after the stream waited for its slots)
    done: Optional[torch.cuda.Event] = None  # recorded after its last chunk

    @property
    def issued(self) -> bool:
        return self.done is not None

    def arrived(self) -> bool:
        """Issued and finished on the device (an unrecorded event would answer True to query())."""
        return self.done is not None and self.done.query()


def chunk_bytes(chunk: tuple[torch.Tensor, torch.Tensor]) -> int:
    return chunk[1].numel() * chunk[1].element_size()


class SwapInPacer:
    def __init__(self, initial_bytes_per_s: float = INITIAL_BYTES_PER_S) -> None:
        self.queued: deque[InCopy] = deque()  # copies with chunks not yet issued, oldest first
        # Batches issued and not seen finished: (start event, end event, bytes), oldest first.
        self.batches: deque[tuple[torch.cuda.Event, torch.cuda.Event, int]] = deque()
        self.bytes_per_s = initial_bytes_per_s
        self._last_due: Optional[float] = None
        self._periods: deque[float] = deque(maxlen=PERIODS_KEPT)  # the last launches' periods (s)
        # Diagnostics (benchmarks/device_op_timer.py): chunks handed out by due(), and forced by through().
        self.paced_chunks = 0
        self.forced_chunks = 0

    def queue(self, copy: InCopy) -> None:
        self.queued.append(copy)

    def batch_issued(self, start: torch.cuda.Event, end: torch.cuda.Event, nbytes: int) -> None:
        """The caller issued chunks of `nbytes` between `start` and `end` (timing events, copy stream)."""
        self.batches.append((start, end, nbytes))

    def _settle(self) -> None:
        """Drops finished batches, timing each into the rate."""
        while self.batches and self.batches[0][1].query():
            start, end, nbytes = self.batches.popleft()
            ms = start.elapsed_time(end)
            if ms > 0:  # a short moving average: one slow batch should not stall pacing
                self.bytes_per_s = 0.7 * self.bytes_per_s + 0.3 * (nbytes / (ms / 1e3))

    def _take(self, budget: int) -> list[tuple[InCopy, int]]:
        """(copy, chunks) from the front of the queue: up to `budget` bytes, and at least one chunk."""
        out: list[tuple[InCopy, int]] = []
        while self.queued:
            copy = self.queued[0]
            count = 0
            for chunk in copy.chunks:
                size = chunk_bytes(chunk)
                if size > budget and (out or count):
                    break
                count += 1
                budget -= size
            if count:
                out.append((copy, count))
            if count < len(copy.chunks):
                break
            self.queued.popleft()
        return out

    def due(self, now: Optional[float] = None) -> list[tuple[InCopy, int]]:
        """What to issue after this step's uploads: (copy, its next chunks), oldest first, up to the
        bytes the engine moves in PERIOD_SHARE of one step, and at least one chunk (a swap in always
        progresses). The chunks start once the step's inputs are on the device and must be done before
        the next step's are: a step lasts about the time between launches, but a long prefill step's
        period must not size the budget of the short decode step that may follow it, so the period
        counted is the smaller of this one and the median of the last PERIODS_KEPT."""
        now = time.perf_counter() if now is None else now
        period = MAX_PERIOD_S if self._last_due is None else min(MAX_PERIOD_S, now - self._last_due)
        self._last_due = now
        self._periods.append(period)
        typical = sorted(self._periods)[len(self._periods) // 2]
        self._settle()
        budget = int(PERIOD_SHARE * min(period, typical) * self.bytes_per_s)
        out = self._take(budget)
        self.paced_chunks += sum(n for _, n in out)
        return out

    def through(self, slots: Sequence[int] = (), copy: Optional[InCopy] = None) -> list[tuple[InCopy, int]]:
        """Every chunk left of the queued copies up to and including `copy`, or the last one reading any
        of `slots`: to issue now (oldest first), before the caller's finish or swap out."""
        wanted = set(slots)
        last = -1
        for i, queued in enumerate(self.queued):
            if queued is copy or (wanted and not wanted.isdisjoint(queued.slots)):
                last = i
        out = [(c, len(c.chunks)) for c in list(self.queued)[:last + 1]]
        for _ in range(last + 1):
            self.queued.popleft()
        self.forced_chunks += sum(n for _, n in out)
        return out

    def all(self) -> list[tuple[InCopy, int]]:
        out = [(c, len(c.chunks)) for c in self.queued]
        self.queued.clear()
        return out
