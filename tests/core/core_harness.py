"""Drives Scheduler + KVCacheManager + BlockPool the way the engine does, with no model.

This is the one place that knows the step contract (DESIGN.md), as engine/launch.py and
OutputProcessor.update_from_output implement it on the synchronous path: a row computes
`num_scheduled_tokens` tokens (its known tokens, then the speculative tokens the scheduler gave it);
when it reaches the end of its known tokens it samples at 1 + k positions, keeps the speculative
tokens the target's samples accept plus the target's next sample, appended one by one until one
finishes the request, and rolls `num_computed_tokens` back by the rejected ones. Tests set
`Request.spec_token_ids` (see `propose`) and call `step`.

A fake KV store stands in for the device pages: every written slot records the token id whose KV it
would hold, the step's device ops (page copies, swaps out and in) copy those records through the
runner's own `execute_device_ops`, and after each step every running request's computed positions
must read back its own tokens (a wrong prefix-cache hit, a missed copy-on-write, a swap in of the
wrong slots or a page handed out twice shows up as a mismatch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from agentserve.cache.block_pool import BlockPool
from agentserve.cache.device_ops import DeviceOp, execute_device_ops
from agentserve.cache.kv_cache_manager import KVCacheManager
from agentserve.config import SchedulerConfig
# The tests import Request from here: this is the one place that knows where it lives.
from agentserve.request import Request, RequestStatus
from agentserve.engine.scheduler import Scheduler, SchedulerOutput
from agentserve.lora.key import LoRAKeys
from agentserve.sampling_params import SamplingParams

__all__ = ["CoreHarness", "Request", "RequestStatus", "StepRecord", "greedy_continuation", "next_token_of_context"]

NextToken = Callable[[Sequence[int]], int]


def next_token_of_context(tokens: Sequence[int]) -> int:
    """A deterministic stand-in for greedy decoding: the next token depends only on the tokens so far,
    so a request recomputed after a preemption generates exactly what it would have otherwise."""
    tail = tokens[-3:]
    return (sum(t * (i + 1) for i, t in enumerate(tail)) * 31 + len(tokens)) % 997 + 3


def greedy_continuation(tokens: Sequence[int], k: int, next_token: NextToken = next_token_of_context) -> list[int]:
    """The k tokens the stand-in target generates after `tokens` (speculative tokens all accepted)."""
    context = list(tokens)
    for _ in range(k):
        context.append(next_token(context))
    return context[len(tokens):]


@dataclass
class StepRecord:
    """What one step did: the scheduler's output, the device ops it ran (the runner takes them off
    `output.device_ops` as it runs them), the last token each sampling row appended (all of them in
    `appended`), the speculative tokens each row accepted, who finished."""
    output: SchedulerOutput
    num_tokens: dict[str, int]
    device_ops: list[DeviceOp] = field(default_factory=list)
    sampled: dict[str, int] = field(default_factory=dict)
    appended: dict[str, list[int]] = field(default_factory=dict)
    num_accepted: dict[str, int] = field(default_factory=dict)
    finished: list[str] = field(default_factory=list)


class FakePages:
    """Per page and slot, the token id whose KV the slot holds (None: never written); per CPU swap
    slot, the same for a swapped-out page. A cache/device_ops.PageStore, like the KV cache."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.slots: list[list[Optional[int]]] = [[None] * block_size for _ in range(num_blocks)]
        self.swap: dict[int, list[Optional[int]]] = {}
        self.staged: dict[int, list[list[Optional[int]]]] = {}  # started swap ins, by ticket

    def copy_blocks(self, pairs: Sequence[tuple[int, int]]) -> None:
        sources = [list(self.slots[src]) for src, _ in pairs]  # all read before any is written, as on the device
        for (_, dst), contents in zip(pairs, sources):
            self.slots[dst] = contents

    def swap_out(self, device_blocks: Sequence[int], swap_slots: Sequence[int]) -> None:
        for page, slot in zip(device_blocks, swap_slots, strict=True):
            self.swap[slot] = list(self.slots[page])

    def swap_in_start(self, swap_slots: Sequence[int], ticket: int) -> None:
        self.staged[ticket] = [list(self.swap[slot]) for slot in swap_slots]  # the copy reads the slots now

    def swap_in_finish(self, device_blocks: Sequence[int], ticket: int) -> None:
        for page, contents in zip(device_blocks, self.staged.pop(ticket), strict=True):
            self.slots[page] = contents

    def swap_in_ready(self, ticket: int) -> bool:
        return True

    def step_launched(self, inputs_uploaded: Optional[torch.cuda.Event] = None) -> None:
        """Nothing is held back: swap ins here copy at their start."""

    def no_step_launched(self) -> None:
        """Nothing is held back: swap ins here copy at their start."""

    def write(self, page: int, offset: int, token_id: int) -> None:
        self.slots[page][offset] = token_id

    def read(self, request: Request, position: int) -> Optional[int]:
        return self.slots[request.block_table[position // self.block_size]][position % self.block_size]


class CoreHarness:
    def __init__(self, *, num_blocks: int = 64, block_size: int = 4, max_num_batched_tokens: int = 64,
                 max_num_seqs: Optional[int] = None, decode_reserve_tokens: int = 0, enable_prefix_caching: bool = True,
                 policy: str = "fcfs", next_token: NextToken = next_token_of_context) -> None:
        self.pool = BlockPool(num_blocks, block_size, enable_prefix_caching)
        self.kv = KVCacheManager(self.pool)
        seqs = {"max_num_seqs": max_num_seqs if max_num_seqs is not None else min(16, max_num_batched_tokens)}
        self.scheduler = Scheduler(SchedulerConfig(
            max_num_batched_tokens=max_num_batched_tokens, decode_reserve_tokens=decode_reserve_tokens,
            policy=policy, **seqs), self.kv)
        self.pages = FakePages(num_blocks, block_size)
        self.next_token = next_token
        self.requests: dict[str, Request] = {}
        self.lora_keys = LoRAKeys()
        self.steps: list[StepRecord] = []

    # --- requests ---------------------------------------------------------------------------------
    def make_request(self, request_id: str, prompt: list[int], max_tokens: int = 4,
                     stop_token_ids: Optional[list[int]] = None, **kwargs: object) -> Request:
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, stop_token_ids=stop_token_ids or [])
        lora_name = kwargs.get("lora_name")
        if isinstance(lora_name, str):  # the engine keys an adapter by its current id + generation
            kwargs["lora_key"] = self.lora_keys.key_of(lora_name)
        request = Request(request_id, prompt, params, **kwargs)  # type: ignore[arg-type]
        self.requests[request_id] = request
        return request

    def add(self, request_id: str, prompt: list[int], max_tokens: int = 4,
            stop_token_ids: Optional[list[int]] = None, **kwargs: object) -> Request:
        request = self.make_request(request_id, prompt, max_tokens, stop_token_ids, **kwargs)
        self.scheduler.add(request)
        return request

    def fork(self, parent: Request, request_id: str, max_tokens: int = 4) -> Request:
        """A sibling sharing the parent's pages copy-on-write, recomputing only the last prompt token
        (what the engine does for n > 1 once the leader's first token is in)."""
        child = self.make_request(request_id, parent.prompt_token_ids, max_tokens)
        child.block_table = self.kv.fork_blocks(parent.block_table)
        child.num_computed_tokens = parent.num_prompt_tokens - 1
        self.scheduler.add_front(child)
        return child

    def abort(self, request: Request) -> None:
        self.scheduler.remove(request, free_blocks=True)
        request.status = RequestStatus.FINISHED_ABORTED

    def propose(self, request: Request, num_correct: int, num_wrong: int = 0) -> list[int]:
        """Gives the request speculative tokens for its next decode: the target's own next
        `num_correct` tokens, then `num_wrong` tokens the target would not generate."""
        spec = greedy_continuation(request.all_token_ids, num_correct + num_wrong, self.next_token)
        for i in range(num_correct, len(spec)):
            spec[i] = spec[i] % 997 + 1000  # outside next_token_of_context's range: always rejected
        request.spec_token_ids = spec
        return list(spec)

    # --- the step ---------------------------------------------------------------------------------
    def step(self) -> StepRecord:
        """Schedules one step, writes its KV into the fake pages, samples each row that reached the
        end of its tokens at 1 + k positions and appends the accepted tokens."""
        out = self.scheduler.schedule()
        record = StepRecord(out, dict(out.num_scheduled_tokens), list(out.device_ops))
        execute_device_ops(self.pages, out.device_ops)  # before the step's writes, as ModelRunner.launch
        for request in out.scheduled:
            num_new = out.num_scheduled_tokens[request.request_id]
            spec = out.spec_token_ids.get(request.request_id, [])
            self._write_kv(request, num_new, spec)
            samples = request.num_computed_tokens + num_new >= request.num_tokens + len(spec)
            request.num_computed_tokens += num_new
            self.kv.cache_full_blocks(request)
            if samples:
                self._append_row(request, spec, record)
        self.check_running_kv()
        self.steps.append(record)
        return record

    def _append_row(self, request: Request, spec: list[int], record: StepRecord) -> None:
        context = list(request.all_token_ids)
        targets = [self.next_token(context + spec[:j]) for j in range(len(spec) + 1)]
        num_accepted = next((j for j, (d, t) in enumerate(zip(spec, targets)) if d != t), len(spec))
        request.spec_token_ids = []
        request.num_computed_tokens -= len(spec) - num_accepted
        record.num_accepted[request.request_id] = num_accepted
        appended = record.appended.setdefault(request.request_id, [])
        for token in targets[:num_accepted + 1]:
            request.output_token_ids.append(token)
            request.all_token_ids.append(token)
            appended.append(token)
            record.sampled[request.request_id] = token
            stopped = token in request.sampling_params.stop_token_ids
            if stopped or request.num_output_tokens >= request.max_tokens:
                request.status = RequestStatus.FINISHED_STOPPED if stopped else RequestStatus.FINISHED_LENGTH
                self.scheduler.remove(request, free_blocks=True)
                record.finished.append(request.request_id)
                return

    def _write_kv(self, request: Request, num_new: int, spec: list[int]) -> None:
        block_size = self.pool.block_size
        tokens = request.all_token_ids + spec
        for position in range(request.num_computed_tokens, request.num_computed_tokens + num_new):
            page = request.block_table[position // block_size]
            assert self.pool.ref_cnt(page) == 1, (
                f"{request.request_id} writes position {position} into page {page} shared "
                f"{self.pool.ref_cnt(page)} ways")
            self.pages.write(page, position % block_size, tokens[position])

    def run(self, max_steps: int = 1000) -> list[StepRecord]:
        """Steps until nothing is waiting or running; returns the records of these steps."""
        first = len(self.steps)
        for _ in range(max_steps):
            if not self.scheduler.has_unfinished():
                return self.steps[first:]
            self.step()
        raise AssertionError(f"still unfinished after {max_steps} steps: {self.scheduler.running}, "
                             f"{list(self.scheduler.waiting)}")

    # --- invariants -------------------------------------------------------------------------------
    def check_running_kv(self) -> None:
        """Every running request's computed positions hold its own tokens' KV, in pages it references."""
        for request in self.scheduler.running:
            assert len(request.block_table) >= self.kv.blocks_needed(request.num_computed_tokens)
            for page in request.block_table:
                assert self.pool.ref_cnt(page) >= 1, f"{request.request_id} holds free page {page}"
            for position in range(request.num_computed_tokens):
                assert self.pages.read(request, position) == request.all_token_ids[position], (
                    f"{request.request_id}: position {position} holds the KV of another token")

    def outputs(self) -> dict[str, list[int]]:
        return {rid: list(r.output_token_ids) for rid, r in self.requests.items()}
