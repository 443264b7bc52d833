"""Builds one engine step under a token budget: running requests first, then waiting ones.

There are no prefill and decode phases: each scheduled request gets some number of new tokens
(a decode is 1, a prefill chunk is up to the remaining budget). When pages run out, a running
request is preempted by recompute (its pages freed, its computed count reset).

Admission keeps preemption rare: a waiting request is admitted only when the free pages, less what
the running requests will still claim (the rest of their prompts and up to `decode_reserve_tokens`
of output), hold its whole prompt and that much output too. A long prompt admitted on the strength
of its first chunk alone would otherwise run the pool dry halfway through its prefill and force the
newest running request (often another long prompt, far into its prefill) out to recompute.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol, Sequence

from agentserve.cache.device_ops import CopyBlocks, DeviceOp
from agentserve.cache.kv_cache_manager import KVCacheManager
from agentserve.config import DEFAULT_LORA_SLOT_WAIT_S, SchedulerConfig
from agentserve.request import Request, RequestStatus


class AdmitHook(Protocol):
    """Hands a waiting request the pages of its prefix when it is admitted, not before (a session's
    turn: the session's pages, swapped back in if they were moved to CPU meanwhile)."""

    def pages_to_restore(self) -> tuple[int, int]:
        """(free pages the restore will take, pages the request will then start with)."""
        ...

    def restore(self, request: Request) -> None:
        """Sets request.block_table / num_computed_tokens (or leaves them empty, to recompute). Called
        again (a no-op) on each later try while restoring() holds."""
        ...

    def restoring(self) -> bool:
        """Whether the pages restore() handed over are still being copied in (a swap in's copy in
        flight): the request waits, and the queue behind it moves on meanwhile."""
        ...


@dataclass
class SchedulerOutput:
    scheduled: list[Request] = field(default_factory=list)
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    # Request id -> the speculative tokens its row verifies (its last num_scheduled_tokens - 1 tokens).
    spec_token_ids: dict[str, list[int]] = field(default_factory=dict)
    # Page copies and swaps to run before this step's forward, in order (cache/device_ops.py).
    device_ops: list[DeviceOp] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.block_size = kv.block_size
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        # Called when a preempted request loses its pages (sessions may want to know).
        # Called when pages run out, before a running request is preempted or a waiting one is held
        # back: frees pages held by idle owners (sessions between turns) and returns how many it
        # freed. Arguments: pages wanted, the request asking (its own session is left alone).
        self.reclaim: Optional[Callable[[int, Request], int]] = None
        # Device ops decided since the last step (sessions' swaps, this step's copies), in order.
        self._device_ops: list[DeviceOp] = []
        # Multi-LoRA (set by the engine with LoRA enabled): at most this many distinct adapters among
        # running requests, so each step's adapters fit the device slots; others wait, skipped over,
        # and, once one has waited lora_slot_wait_s, the requests behind it of the resident adapters wait
        # too (so that those drain).
        self.max_loras: Optional[int] = None
        self.lora_slot_wait_s = DEFAULT_LORA_SLOT_WAIT_S
        # vLLM's long_prefill_token_threshold: no request computes more tokens than this in one step (0: no cap), so
        # a long prompt's chunks leave room in each step's budget for the prompts queued behind it.
        self._chunk_cap = config.long_prefill_token_threshold or config.max_num_batched_tokens

    # --- queues -----------------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def add_front(self, request: Request) -> None:
        self.waiting.appendleft(request)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_rows_ahead(self) -> int:
        """The batch the running one grows to once the waiting requests are admitted (at most
        max_num_seqs): speculation plans for it, so a batch filling up (its steps prefill-heavy,
        larger ones next) does not speculate as if it stayed small."""
        return min(self.config.max_num_seqs, len(self.running) + len(self.waiting))

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def queue_device_ops(self, ops: Sequence[DeviceOp]) -> None:
        """Ops that the next step runs before its forward, after those queued before them."""
        self._device_ops.extend(ops)

    def take_device_ops(self) -> list[DeviceOp]:
        """The queued ops, for a caller that runs them before the next step (the draft model writes
        into pages a queued copy or swap-in must fill first)."""
        ops, self._device_ops = self._device_ops, []
        return ops

    def has_device_ops(self) -> bool:
        """Whether ops wait for a step (an idle engine then runs one with no forward)."""
        return bool(self._device_ops)

    def remove(self, request: Request, free_blocks: bool = True) -> None:
        """Takes a request out of either queue (finish or abort); frees its pages unless the caller
        keeps them (a session turn hands its pages back to the session)."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        if free_blocks:
            self.kv.free(request)

    # --- the step ---------------------------------------------------------------------------------
    def _priority_key(self, request: Request) -> tuple[float, float]:
        # Lower sorts first (served first); the victim of a preemption is the max.
        if self.config.policy == "priority":
            return (request.priority, request.timing.arrival)
        return (0, request.timing.arrival)

    def _preempt(self, victim: Request, out: SchedulerOutput) -> None:
        self.running.remove(victim)
        self.kv.free(victim)
        victim.num_computed_tokens = 0
        victim.num_draft_computed_tokens = 0  # its pages (the draft's KV with them) are freed
        victim.clear_proposal()  # proposed for a decode it will not run
        victim.status = RequestStatus.PREEMPTED
        victim.num_preemptions += 1
        out.preempted.append(victim)
        self.waiting.appendleft(victim)

    def _reclaim(self, request: Request, num_new: int) -> bool:
        if self.reclaim is None:
            return False
        wanted = self.kv.blocks_needed(request.num_computed_tokens + num_new) - len(request.block_table) + 1
        return self.reclaim(max(wanted - self.kv.pool.num_free_blocks, 1), request) > 0

    # --- admission ----------------------------------------------------------------------------------
    def _target_blocks(self, request: Request) -> int:
        """Pages the request is expected to hold: its prompt (and any output so far, after a
        preemption) plus the next token, or up to decode_reserve_tokens of output."""
        reserve = min(request.max_tokens, self.config.decode_reserve_tokens)
        return self.kv.blocks_needed(max(request.num_tokens + 1, request.num_prompt_tokens + reserve))

    def _outstanding_blocks(self) -> int:
        """Pages the running requests will still claim to reach their targets."""
        return sum(max(0, self._target_blocks(r) - len(r.block_table)) for r in self.running)

    def _make_room(self, request: Request, need: int, outstanding: int) -> bool:
        """Whether `need` pages are free beyond what running requests will claim, after asking idle
        owners to give some back. With nothing running there is nobody to wait for: go ahead (the
        chunk's own allocation decides)."""
        short = need - (self.kv.pool.num_free_blocks - outstanding)
        if short > 0 and self.reclaim is not None:
            self.reclaim(short, request)
            short = need - (self.kv.pool.num_free_blocks - outstanding)
        return short <= 0 or not self.running

    def _admission_need(self, request: Request, computed: list[int]) -> int:
        pool = self.kv.pool
        revived = sum(1 for b in computed if pool.ref_cnt(b) == 0)  # cached pages taken off the free list
        table = request.block_table + computed
        first_written = request.num_computed_tokens // self.block_size if not computed else len(table)
        shared = sum(1 for b in table[first_written:] if pool.ref_cnt(b) > 1)  # copied on write
        return revived + shared + max(0, self._target_blocks(request) - len(table))

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self._schedule_running(out, self.config.max_num_batched_tokens)
        self._schedule_waiting(out, budget)
        out.device_ops, self._device_ops = self._device_ops, []
        return out

    def _num_spec_tokens(self, request: Request, budget: int) -> int:
        """How many of the request's speculative tokens to verify in this step: none while a sampled
        token is still in flight (async scheduling: the proposal was made for another position),
        none past max_tokens (a row never samples beyond
        it) and none beyond the token budget. Dropped proposals are cleared."""
        spec = request.spec_token_ids
        if not spec:
            return 0
        if request.num_output_placeholders:
            request.clear_proposal()
            return 0
        k = min(len(spec), budget - 1, request.max_tokens - request.num_output_tokens - 1)
        if k < len(spec):
            request.spec_token_ids = spec[:max(k, 0)]
        return max(k, 0)

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        """Running requests in admission order, under either policy (vLLM V1: priority picks preemption victims,
        never who gets the budget first, so a high-priority prompt's prefill does not stall the decodes). A decode
        with speculative tokens gets 1 + k tokens and KV slots for all of them (lookahead: rejected ones are
        overwritten later). Returns the budget left."""
        copies_of: dict[str, list[DeviceOp]] = {}  # this step's copy-on-write copies per request, to take back
        for request in list(self.running):  # the loop preempts: a snapshot, skipping those preempted meanwhile
            if budget <= 0:
                break
            if out.preempted and request in out.preempted:  # a victim of an earlier row's allocation
                continue
            pending = request.num_output_placeholders
            if pending and 0 < request.max_tokens <= request.num_output_tokens + pending:
                # Async scheduling: the token in flight is its last (max_tokens); it finishes when
                # that step is processed, so computing past it would only be thrown away.
                continue
            num_new = min(request.num_tokens + pending - request.num_computed_tokens, budget, self._chunk_cap)
            if num_new <= 0:
                continue
            num_spec = self._num_spec_tokens(request, budget) if num_new == 1 and request.spec_token_ids else 0
            if not num_spec and request.spec_token_ids:
                request.clear_proposal()  # proposals hold for this schedule only
            num_new += num_spec
            copies, given_back = self._allocate_or_preempt(request, num_new, out, copies_of)
            budget += given_back
            if copies is None:
                continue  # the request preempted itself
            out.scheduled.append(request)
            out.num_scheduled_tokens[request.request_id] = num_new
            if num_spec:
                out.spec_token_ids[request.request_id] = list(request.spec_token_ids)
            if copies:  # a decode in a private page has none: skip building a generator per row
                ops = copies_of[request.request_id] = [CopyBlocks(src, dst) for src, dst in copies]
                self._device_ops.extend(ops)
            budget -= num_new
        return budget

    def _allocate_or_preempt(self, request: Request, num_new: int, out: SchedulerOutput,
                             copies_of: dict[str, list[DeviceOp]]) -> tuple[Optional[list[tuple[int, int]]], int]:
        """Slots for a running request, reclaiming idle pages or preempting running requests until they fit:
        under fcfs the newest (never scheduled yet in this step), under priority vLLM's max of (priority,
        arrival), whose tokens of this step are taken back. (copies, or None when the request itself was
        preempted; tokens given back to the budget.)"""
        given_back = 0
        while True:
            copies = self.kv.allocate_slots(request, num_new)
            if copies is not None:
                return copies, given_back
            if self._reclaim(request, num_new):
                continue
            victim = max(self.running, key=self._priority_key) if self.config.policy == "priority" \
                else self.running[-1]
            if victim is request and self._release_waiting_pages(request, siblings_only=True):
                # Pages the queue holds go first (n > 1 siblings forked onto this request's pages): preempted,
                # it was admitted again at once and ran out at the same point, for ever (a livelock).
                continue
            given_back += self._unschedule(victim, out, copies_of)
            self._preempt(victim, out)
            if victim is request:
                return None, given_back

    def _unschedule(self, victim: Request, out: SchedulerOutput, copies_of: dict[str, list[DeviceOp]]) -> int:
        """Takes back what this step already gave a request about to be preempted; returns its tokens."""
        tokens = out.num_scheduled_tokens.pop(victim.request_id, 0)
        if tokens:
            out.scheduled.remove(victim)
            out.spec_token_ids.pop(victim.request_id, None)
            for op in copies_of.pop(victim.request_id, ()):
                self._device_ops.remove(op)  # its pages are freed: copying into them would write others'
        return tokens

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        """Waiting requests while there is budget, a sequence slot and pages."""
        if self.config.policy == "priority" and len(self.waiting) > 1:
            self.waiting = deque(sorted(self.waiting, key=self._priority_key))
        skipped: list[Request] = []
        outstanding: Optional[int] = None  # computed once, only when something is waiting
        adapters = {r.lora_key for r in self.running if r.lora_key is not None} if self.max_loras else set()
        # A request ahead in the queue has waited for a LoRA slot past lora_slot_wait_s.
        slot_overdue = False
        now = time.monotonic()
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            if request.status == RequestStatus.WAITING_FOR_GRAMMAR:
                skipped.append(self.waiting.popleft())  # its grammar is still compiling
                continue
            key = request.lora_key
            if self.max_loras and key is not None and key not in adapters and len(adapters) >= self.max_loras:
                skipped.append(self.waiting.popleft())  # every LoRA slot is taken: wait for one to free
                slot_overdue = slot_overdue or now - request.timing.arrival >= self.lora_slot_wait_s
                continue
            if slot_overdue and key is not None:
                # Behind a request overdue for a slot, the resident adapters take no new requests: they drain
                # and free a slot for it, instead of a steady stream keeping them resident for ever. Not at
                # once: admitting beside a resident adapter is what keeps batches full when adapters
                # outnumber slots (the multi-adapter throughput), so fairness waits lora_slot_wait_s.
                skipped.append(self.waiting.popleft())
                continue
            if request.admit_hook is not None and request.admit_hook.restoring():
                skipped.append(self.waiting.popleft())  # its pages are on their way: admitted when in
                continue
            if request.num_output_placeholders:
                # Preempted while its last sampled token was in flight: a recompute needs that token
                # on the host, which the next processed step brings. Keep the queue order meanwhile.
                break
            if outstanding is None:
                outstanding = self._outstanding_blocks()
            num_new = self._admit(request, budget, outstanding, out)
            if num_new is None:
                if request.admit_hook is not None and request.admit_hook.restoring():
                    skipped.append(self.waiting.popleft())  # its copy has just started
                    continue
                if not self.running and self._release_waiting_pages(request):
                    outstanding = None
                    continue  # nothing runs to free pages: retry the head with the queue's pages
                break  # head-of-line waits for pages
            outstanding += max(0, self._target_blocks(request) - len(request.block_table))
            budget -= num_new
            if key is not None:
                adapters.add(key)
        self.waiting.extendleft(reversed(skipped))

    def _release_waiting_pages(self, head: Request, siblings_only: bool = False) -> bool:
        """Frees the pages that requests other than `head` hold while they wait (an n > 1 sibling forked
        onto its leader's pages); they recompute when admitted. Only when nothing else would ever free
        pages: nothing runs and the head needs them, or (`siblings_only`: n > 1 sequences alone, never a
        session turn whose pages may be on their way in) a running request would otherwise preempt itself."""
        released = False
        for request in self.waiting:
            if siblings_only and request.request_id == request.parent_id:
                continue
            if request is not head and request.block_table:
                self.kv.free(request)
                request.num_computed_tokens = 0
                request.clear_proposal()
                released = True
        return released

    def _admit(self, request: Request, budget: int, outstanding: int, out: SchedulerOutput) -> Optional[int]:
        """Admits the head of the waiting queue if its pages fit; returns the tokens scheduled, or
        None when it must wait."""
        hook = request.admit_hook
        if hook is not None:
            to_take, start_pages = hook.pages_to_restore()
            need = to_take + max(0, self._target_blocks(request) - start_pages) + 1  # +1: a COW copy
            if not self._make_room(request, need, outstanding):
                return None
            hook.restore(request)
            if hook.restoring():
                return None
            request.admit_hook = None
        computed: list[int] = []
        if not request.block_table:  # requests handed pages (sessions, forks) skip the lookup
            computed = self.kv.get_computed_blocks(request)
        if not self._make_room(request, self._admission_need(request, computed), outstanding):
            return None
        num_computed = request.num_computed_tokens + len(computed) * self.kv.block_size
        num_new = min(request.num_tokens - num_computed, budget, self._chunk_cap)
        copies = self.kv.allocate_slots(request, num_new, computed)
        if copies is None and self._reclaim(request, num_new):
            copies = self.kv.allocate_slots(request, num_new, computed)
        if copies is None:
            return None
        self.waiting.popleft()
        if request.num_cached_tokens < 0:
            request.num_cached_tokens = num_computed
        request.status = RequestStatus.RUNNING
        self.running.append(request)
        out.scheduled.append(request)
        out.num_scheduled_tokens[request.request_id] = num_new
        self._device_ops.extend(CopyBlocks(src, dst) for src, dst in copies)
        return num_new
