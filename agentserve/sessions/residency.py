"""Where a session's KV lives between turns: on the device, in CPU swap space, or nowhere.

Between turns a session's pages are pinned (its block table holds references). A turn's request takes
the session's pages only when the scheduler admits it (`TurnAdmission`, a scheduler.AdmitHook): until
then a queued turn holds nothing of its own, and the scheduler admits it only when its whole prompt
fits next to what the running requests will claim, so running turns are rarely preempted. When pages
run short the scheduler calls `reclaim`, which takes pages from sessions before anything running is
touched: first idle sessions past their expected-next-turn hint, then those without a hint, then
those expected back soon (least recently used first within each group), and last the sessions whose
turn is queued but not admitted (the newest arrivals first). An evicted session's pages are copied
to CPU swap space (SWAPPED) — all but the leading pages that other owners still hold and that are
findable by hash (a common system prompt and tools, left to the prefix cache) — or, when swap is
full, dropped (EVICTED; their full pages stay findable by hash until reused, so the next turn
recomputes only what is gone). A swap-in keeps the swap copies of the session's full pages, so its
next swap-out copies only the pages written since (sessions/swap_copies.py). At admission a swapped
session is copied back in, reusing leading pages still in the prefix cache; its turn waits in the
queue while running requests hold the pages it needs (Timing.swap_wait_ms) rather than dropping the
copy and recomputing.

The copies themselves are device ops (cache/device_ops.py) queued on the scheduler: they run with
the next step, before its forward, on every rank. Page bookkeeping changes here at once; the stream
order of the ops keeps the data right (a page freed after a swap out is rewritten only after it).
A swap in is two ops: SwapInStart begins the copy (on CUDA over a copy stream, which no step waits
for), SwapInFinish writes it into the pages. Between them the session is RESIDENT but `restoring`:
its turn stays queued (TurnAdmission.restoring, polled by the scheduler) until the copy has arrived,
so the steps meanwhile run without waiting for PCIe, and the finish is queued with the step that
admits the turn. Anything else that touches a restoring session's pages settles it first (queues the
finish at once). Everything here runs on the engine's step thread.
"""

from __future__ import annotations

import itertools
import os
import time
from typing import Callable, Optional

from agentserve.cache.block_pool import BlockPool, compute_block_hashes
from agentserve.cache.device_ops import SwapInFinish, SwapInStart, SwapOut
from agentserve.cache.kv_cache_manager import KVCacheManager
from agentserve.request import Request
from agentserve.engine.scheduler import Scheduler
from agentserve.sessions.swap_copies import SwapCopies
from agentserve.sessions.types import PendingTurn, Restore, Session, SessionState, SessionStats

# Swap ins whose copies may be in flight at once: each holds a staging copy of its pages on the
# device beside the KV pool, so they are bounded (the oldest is finished to start one more, and the
# step's stream then waits for its copy). Four: on the H200's agent loop (64 agents, pool 25%) two forced
# 36 of ~300 finishes before their copy arrived, four forced 2, and the swap-in scatters' stream time
# fell 328 -> 184 ms (benchmarks/NOTES.md, twentieth session). AGENTSERVE_MAX_SWAP_INS_IN_FLIGHT overrides it.
MAX_RESTORES_IN_FLIGHT = int(os.environ.get("AGENTSERVE_MAX_SWAP_INS_IN_FLIGHT", "4"))


class Residency:
    """Evicts, swaps, drops and restores the pages of a store's sessions (`sessions`, `pending`: the
    store's own maps of open sessions and of turns in flight by request id)."""

    def __init__(self, pool: BlockPool, kv: KVCacheManager, scheduler: Scheduler, num_swap_slots: int,
                 sessions: dict[str, Session], pending: dict[str, PendingTurn], stats: SessionStats,
                 copy_ready: Callable[[int], bool] = lambda ticket: True, pages_hold_draft: bool = False) -> None:
        self.pool = pool
        self.kv = kv
        self.scheduler = scheduler
        self.block_size = pool.block_size
        self.num_swap_slots = num_swap_slots
        self.sessions = sessions
        self.pending = pending
        self.stats = stats
        # Swap slots of swapped sessions, and the copies a swap-in keeps (`pages_hold_draft`: a draft model's
        # KV lives in the same pages, so a page's copy is final only once the draft's KV is there too).
        self.copies = SwapCopies(num_swap_slots, sessions, pool.block_size, pages_hold_draft)
        # Whether a started swap in's copy has arrived (ModelRunner.swap_in_ready: rank 0's pages).
        self.copy_ready = copy_ready
        self._tickets = itertools.count()
        self._restoring: list[Session] = []  # sessions with a copy in flight, oldest first

    @property
    def num_free_swap_slots(self) -> int:
        return self.copies.num_free

    # --- page ownership -------------------------------------------------------------------------------
    def release(self, s: Session) -> None:
        """Frees everything the session holds (pages, swap slots); it is CLOSED from here on."""
        self.settle(s)
        if s.block_table:
            self.pool.free(s.block_table)
            s.block_table = []
        self.free_swap(s)
        s.num_computed = 0
        s.state = SessionState.CLOSED

    def free_swap(self, s: Session) -> None:
        self.copies.free(s)

    def keep_prefix(self, s: Session, keep: int) -> None:
        """Keeps only the KV of the first `keep` tokens (a re-rendered history shares only those)."""
        self.settle(s)
        if keep >= s.num_computed:
            return
        if s.state is SessionState.RESIDENT:
            pages = -(-keep // self.block_size)
            self.pool.free(s.block_table[pages:])
            s.block_table = s.block_table[:pages]
            s.num_computed = keep
            s.num_draft_computed = min(s.num_draft_computed, keep)
            self.copies.keep_final(s, keep // self.block_size)  # copies of the pages kept whole stay valid
        elif s.state is SessionState.SWAPPED:  # rare (a re-render of a swapped session): recompute
            self.free_swap(s)
            s.state = SessionState.EVICTED
            s.num_computed = 0

    def adopt(self, s: Session, block_table: list[int], num_computed: int, num_draft_computed: int = 0) -> None:
        """The session takes a finished turn's pages in place of what it held (`num_draft_computed`:
        leading tokens whose draft-model KV they hold too). The turn extended the session's history, so
        the copies a resident session kept of its full pages stay valid."""
        self.settle(s)
        if s.block_table:
            self.pool.free(s.block_table)
        if s.state is not SessionState.RESIDENT:
            self.free_swap(s)
        s.block_table = block_table
        s.num_computed = num_computed
        s.num_draft_computed = min(num_draft_computed, num_computed)
        s.state = SessionState.RESIDENT
        self.copies.keep_final(s)

    def share(self, parent: Session, child: Session) -> None:
        """A fork: the child shares every page of the parent (copy-on-write: the first write into a
        shared partial page copies that one page), after a swapped parent is brought back in."""
        if parent.state is SessionState.SWAPPED:
            self.swap_in(parent)
        self.settle(parent)  # the child's first forward may come before the parent's turn
        if parent.state is SessionState.RESIDENT:
            child.block_table = self.kv.fork_blocks(parent.block_table)
            child.num_computed = parent.num_computed
            child.num_draft_computed = parent.num_draft_computed
            child.state = SessionState.RESIDENT
        else:
            child.state = parent.state  # NEW or EVICTED: nothing to share; the prefix cache may still hold pages

    # --- eviction ---------------------------------------------------------------------------------------
    def eviction_order(self, exclude: Optional[Session] = None) -> list[Session]:
        """Idle resident sessions, the first to evict first: past their expected-next-turn hint, then without
        one, then expected back; least recently used first in each group. (Latest expected first among those
        expected back, Belady's order, was measured on the H200's agent loop: the same swap-ins, since under
        that pressure every idle session is evicted anyway; benchmarks/NOTES.md, twentieth session.)"""
        now = time.monotonic()

        def key(s: Session) -> tuple[int, float]:
            if s.expected_by is None:
                group = 1
            elif now > s.expected_by:
                group = 0
            else:
                group = 2
            return (group, s.last_active)

        idle = [s for s in self.sessions.values()
                if s is not exclude and s.busy is None and s.state is SessionState.RESIDENT and s.block_table]
        return sorted(idle, key=key)

    def reclaim(self, wanted: int, request: Optional[Request] = None, exclude: Optional[Session] = None) -> int:
        """The scheduler's hook: frees up to `wanted` pages (at least that many if it can) by evicting
        sessions; the session of `request` (the one asking) is left alone, but for its tail (below).
        Returns the pages freed or spared (a copy its turn no longer needs)."""
        if request is not None and exclude is None:
            asking = self.pending.get(request.parent_id)
            exclude = asking.session if asking is not None else None
        freed = 0
        # Idle sessions, then sessions whose turn is still queued (they get their pages back at
        # admission, from swap). First the sessions whose eviction frees pages now; then, if that was
        # not enough, the ones whose pages are all shared (dropping their references lets the other
        # owners' pages go).
        order = self.eviction_order(exclude) + self._queued_turn_sessions(exclude)
        for zero_gain_pass in (False, True):
            for s in order:
                if freed >= wanted:
                    return freed
                if s.state is not SessionState.RESIDENT or not s.block_table:
                    continue
                exclusive = sum(1 for b in s.block_table if self.pool.ref_cnt(b) == 1)
                if exclusive == 0 and not zero_gain_pass:
                    continue
                freed += self.evict(s)
                self.stats.queued_evicted += s.busy is not None
        if freed < wanted and request is not None and exclude is not None:
            freed += self._give_tail_to_turn(exclude, request)
        return freed

    def _give_tail_to_turn(self, s: Session, request: Request) -> int:
        """Last resort: the asking session drops its references to the pages its own turn writes next
        (the partial last page). The turn holds copy-on-write references to all of them, so writing that
        page takes a copy, one page beyond the turn's tokens: with a pool the session fills, a page that
        nothing would ever free (the queue then waited for ever). This frees nothing, but the page becomes
        the turn's alone. The session keeps its full pages; if the turn is cancelled, the next one
        recomputes the tail. Returns the copies spared."""
        first = request.num_computed_tokens // self.block_size
        tail = s.block_table[first:]
        if s.state is not SessionState.RESIDENT or not tail or tail != request.block_table[first:first + len(tail)]:
            return 0
        self.keep_prefix(s, first * self.block_size)
        return sum(1 for b in tail if self.pool.ref_cnt(b) == 1)

    def _queued_turn_sessions(self, exclude: Optional[Session]) -> list[Session]:
        """Resident sessions whose turn waits in the queue without its pages yet, newest arrival first."""
        queued = []
        for req in reversed(self.scheduler.waiting):
            pending = self.pending.get(req.parent_id)
            if pending is None or req.admit_hook is None:
                continue
            s = pending.session
            if s is exclude or s.state is not SessionState.RESIDENT or not s.block_table:
                continue
            if s.restoring is not None and req.block_table:
                continue  # its turn already holds the pages on their way in: evicting frees none of them
            # A restore in flight whose turn holds none of its pages (the scheduler released them while
            # the turn waited) is evictable: else a head of the queue that needs those pages, with
            # nothing running, would wait for them forever. The turn restores again when admitted.
            queued.append(s)
        return queued

    def evict(self, s: Session) -> int:
        """Swaps the session's pages out to CPU, or drops them when swap is full. Leading pages that
        other owners still hold and that are findable by hash (a common system prompt and tools) stay
        on the device: the swap-in finds them in the prefix cache, and a preamble shared by many
        agents is neither copied out and back on every eviction nor stored in swap once per agent.
        Returns the pages freed on the device."""
        if s.state is not SessionState.RESIDENT or not s.block_table:
            # Nothing on the device to give up. A swapped session evicted again would otherwise
            # lose its swap slots (overwritten by an empty list) while keeping its KV count.
            return 0
        self.settle(s)
        table = s.block_table
        exclusive = sum(1 for b in table if self.pool.ref_cnt(b) == 1)
        swapped = False
        if self.num_swap_slots > 0:
            k = 0
            while (k < len(table) and self.pool.ref_cnt(table[k]) > 1
                   and self.pool.block_hash(table[k]) is not None):
                k += 1
            missing = self.copies.missing(s, k, len(table))
            if missing > self.copies.num_free:
                self.stats.swap_copies_released += self.copies.release_others(missing, exclude=s)
            if missing <= self.copies.num_free:
                to_copy = self.copies.cover(s, k)  # the pages' kept copies are reused, the rest copied
                if to_copy:
                    # Queued before the pages are freed below: whatever reuses them runs after the copy.
                    blocks, slots = zip(*to_copy)
                    self.scheduler.queue_device_ops([SwapOut(tuple(blocks), tuple(slots))])
                s.state = SessionState.SWAPPED
                swapped = True
                self.stats.swap_outs += 1
                self.stats.pages_swapped_out += len(to_copy)
                self.stats.pages_swap_reused += len(s.swap_slots) - len(to_copy)
        if not swapped:
            self.free_swap(s)
            s.state = SessionState.EVICTED
            s.num_computed = 0
            self.stats.drops += 1
        self.pool.free(table)
        s.block_table = []
        return exclusive

    # --- restore ----------------------------------------------------------------------------------------
    def _swap_in_plan(self, s: Session, count: bool) -> tuple[list[bytes], list[int], int]:
        """(hashes of the session's full pages, leading pages of them still in the prefix cache, #full)."""
        num_full = min(s.num_computed // self.block_size, s.swap_from + len(s.swap_slots))
        hashes: list[bytes] = []
        if self.pool.enable_prefix_caching and num_full:
            hashes = compute_block_hashes(s.token_ids[:num_full * self.block_size], self.block_size, s.extra_key, [])
        hits = self.pool.lookup(hashes, num_full, num_full * self.block_size, count=count) if hashes else []
        return hashes, hits, num_full

    def restore_cost(self, s: Session) -> tuple[int, int]:
        """(free pages a swap-in of `s` takes, pages it then holds); (0, 0) when the swap-in cannot work
        (pages left to the prefix cache are gone: the turn recomputes)."""
        _, hits, _ = self._swap_in_plan(s, count=False)
        if len(hits) < s.swap_from:
            return 0, 0
        total = s.swap_from + len(s.swap_slots)
        return total - len(hits) + sum(1 for b in hits if self.pool.ref_cnt(b) == 0), total

    def swap_in(self, s: Session) -> bool:
        """Restores a swapped session's pages: leading full pages still in the prefix cache are
        reused as they are, the rest are copied back from swap. On failure (pages that were left to
        the prefix cache are gone, or no free pages even after evicting other idle sessions) the
        session becomes EVICTED: its turn recomputes, with whatever the prefix cache still holds."""
        hashes, hits, num_full = self._swap_in_plan(s, count=True)
        ok = len(hits) >= s.swap_from
        copy = s.swap_from + len(s.swap_slots) - len(hits)

        def need() -> int:
            return copy + sum(1 for b in hits if self.pool.ref_cnt(b) == 0)

        if ok and need() > self.pool.num_free_blocks:
            self.reclaim(need() - self.pool.num_free_blocks, exclude=s)
        if not ok or need() > self.pool.num_free_blocks:
            self.free_swap(s)
            s.state = SessionState.EVICTED
            s.num_computed = 0
            self.stats.swap_in_failures += 1
            return False
        self.pool.touch(hits)
        fresh = self.pool.allocate(copy)
        s.block_table = list(hits) + fresh
        # Restored full pages become findable by hash again (forks, evicted-recompute paths), once
        # their data is in them.
        restore = Restore(next(self._tickets), tuple(fresh), tuple(hashes[:min(num_full, len(hashes))]), len(hits))
        if copy:
            if len(self._restoring) >= MAX_RESTORES_IN_FLIGHT:
                self._finish_restore(self._restoring[0], forced=True)
            # Started now; finished (written into the pages) before any forward that reads them.
            self.scheduler.queue_device_ops([SwapInStart(tuple(s.swap_slots[len(hits) - s.swap_from:]), restore.ticket)])
            s.restoring = restore
            self._restoring.append(s)
        else:
            self._register_restored(s, restore)
        s.state = SessionState.RESIDENT
        self.copies.keep_final(s)  # the full pages' copies stay: the next swap-out of `s` skips them
        self.stats.swap_ins += 1
        self.stats.pages_swapped_in += copy
        return True

    def restored(self, s: Session) -> bool:
        """Whether the session's pages can be read: no copy in flight, or it has arrived (then its
        finish is queued here, ahead of the forward that will read the pages)."""
        if s.restoring is None:
            return True
        if not self.copy_ready(s.restoring.ticket):
            return False
        self._finish_restore(s)
        return True

    def settle(self, s: Session) -> None:
        """Queues the finish of the session's copy now, arrived or not (the step's stream then waits
        for it): for what touches the pages before its turn runs (eviction, forks, release)."""
        if s.restoring is not None:
            self._finish_restore(s, forced=True)

    def _finish_restore(self, s: Session, forced: bool = False) -> None:
        """`forced`: queued without having seen the copy arrive (the step's stream may wait for it)."""
        restore = s.restoring
        assert restore is not None
        self.stats.swap_in_finishes_forced += forced
        s.restoring = None
        self._restoring.remove(s)
        self.scheduler.queue_device_ops([SwapInFinish(restore.blocks, restore.ticket)])
        self._register_restored(s, restore)

    def _register_restored(self, s: Session, restore: Restore) -> None:
        for i in range(restore.first_hashed, len(restore.hashes)):
            self.pool.cache_block(s.block_table[i], restore.hashes[i])

    def admit(self, pending: PendingTurn, request: Request) -> None:
        """The turn's request takes its own copy-on-write references to the session's pages, after
        swapping them back in if they were moved out."""
        s = pending.session
        if s.state is SessionState.SWAPPED:
            pending.swap_wait_ms = (time.monotonic() - pending.began_at) * 1e3
            t0 = time.perf_counter()
            if self.swap_in(s):
                pending.swapped_in_tokens = s.num_computed
            pending.swap_in_ms = (time.perf_counter() - t0) * 1e3
        if s.state is SessionState.RESIDENT and s.num_computed > 0:
            request.block_table = self.kv.fork_blocks(s.block_table)
            request.num_computed_tokens = request.num_cached_tokens = s.num_computed
            # The draft's KV moved with the pages (resident, swapped, forked), so the turn's draft computes
            # only past it, not the whole history again.
            request.num_draft_computed_tokens = min(s.num_draft_computed, s.num_computed)


class TurnAdmission:
    """scheduler.AdmitHook for a session turn (runs on the step thread, inside schedule())."""

    def __init__(self, residency: Residency, pending: PendingTurn) -> None:
        self.residency = residency
        self.pending = pending
        self.started = False

    def pages_to_restore(self) -> tuple[int, int]:
        s = self.pending.session
        if s.state is SessionState.RESIDENT:
            return 0, len(s.block_table)
        if s.state is SessionState.SWAPPED:
            return self.residency.restore_cost(s)
        return 0, 0

    def restore(self, request: Request) -> None:
        # The scheduler asks again while the copy is in flight (the request holds the pages then);
        # a request whose pages it released while waiting takes the session's pages again.
        if not self.started or not request.block_table:
            self.started = True
            self.residency.admit(self.pending, request)

    def restoring(self) -> bool:
        """Whether the turn waits for its session's pages to arrive (the scheduler skips it meanwhile)."""
        return self.started and not self.residency.restored(self.pending.session)
