"""Free-slot bookkeeping for the CPU swap space, as sorted free ranges.

A swap copies one contiguous host range per run of consecutive slots (cache/kv_cache.py), so the
allocator hands out consecutive slots where it can: next fit over the free ranges (the first range long
enough at or after the end of the last allocation, wrapping around), and only when no single range is
long enough, pieces of several. Freed slots merge back with their neighbours.

Next fit rather than first fit: a swap in frees its slots when it starts, while its copy may still be
queued behind the steps' uploads (cache/swap_in_pacer.py); a swap out that reuses those slots must issue
that copy first, ahead of the step's uploads, which then wait for it. First fit handed the lowest free
slots, usually exactly those, to the very next swap out; next fit reuses them only after going round the
swap space.
"""

from __future__ import annotations

import bisect
from typing import Sequence


def consecutive_runs(values: Sequence[int]) -> list[tuple[int, int]]:
    """(offset, length) of each run of consecutive integers in `values`, in order: one host copy per run of
    swap slots in a swap (cache/kv_cache.py), one merge per run of freed slots here."""
    runs: list[tuple[int, int]] = []
    i = 0
    while i < len(values):
        j = i + 1
        while j < len(values) and values[j] == values[j - 1] + 1:
            j += 1
        runs.append((i, j - i))
        i = j
    return runs


class SwapSlots:
    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        # Disjoint, non-adjacent free ranges sorted by start: starts[i] .. starts[i] + lengths[i] - 1.
        self._starts: list[int] = [0] if num_slots else []
        self._lengths: list[int] = [num_slots] if num_slots else []
        self.num_free = num_slots
        self._next = 0  # where the next search starts: just past the last slots handed out

    def allocate(self, n: int) -> list[int]:
        """n free slots, consecutive when any free range holds n. Raises when fewer than n are free."""
        if n > self.num_free:
            raise ValueError(f"asked for {n} swap slots, {self.num_free} free")
        if n == 0:
            return []
        first = bisect.bisect_left(self._starts, self._next)  # ranges starting at or after the cursor first
        count = len(self._starts)
        for i in [*range(first, count), *range(first)]:
            if self._lengths[i] >= n:
                return self._advance(self._take(i, n))
        slots: list[int] = []
        while len(slots) < n:  # fragmented: the longest ranges first, to keep copies few
            i = max(range(len(self._lengths)), key=self._lengths.__getitem__)
            slots.extend(self._take(i, min(n - len(slots), self._lengths[i])))
        return self._advance(sorted(slots))

    def _advance(self, slots: list[int]) -> list[int]:
        self._next = (slots[-1] + 1) % self.num_slots
        return slots

    def _take(self, i: int, n: int) -> list[int]:
        start = self._starts[i]
        if self._lengths[i] == n:
            del self._starts[i], self._lengths[i]
        else:
            self._starts[i] += n
            self._lengths[i] -= n
        self.num_free -= n
        return list(range(start, start + n))

    def free(self, slots: list[int]) -> None:
        ordered = sorted(slots)
        for i, n in consecutive_runs(ordered):
            self._free_run(ordered[i], n)

    def _free_run(self, start: int, n: int) -> None:
        end = start + n
        i = bisect.bisect_right(self._starts, start)
        if (i > 0 and self._starts[i - 1] + self._lengths[i - 1] > start) or (i < len(self._starts)
                                                                               and self._starts[i] < end):
            raise ValueError(f"swap slots {start}..{end - 1} include a free slot (freed twice)")
        joins_left = i > 0 and self._starts[i - 1] + self._lengths[i - 1] == start
        joins_right = i < len(self._starts) and self._starts[i] == end
        if joins_left and joins_right:
            self._lengths[i - 1] += n + self._lengths[i]
            del self._starts[i], self._lengths[i]
        elif joins_left:
            self._lengths[i - 1] += n
        elif joins_right:
            self._starts[i] = start
            self._lengths[i] += n
        else:
            self._starts.insert(i, start)
            self._lengths.insert(i, n)
        self.num_free += n
