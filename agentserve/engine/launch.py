"""Launching one engine step: rows from the scheduler's output, the launch (with failures contained
to the requests they belong to), and the bookkeeping of what the launched step computes."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, Optional

from agentserve.cache.device_ops import DeviceOp
from agentserve.engine.failures import (STEP_FAILED, STEP_FAILED_FOR_NEW_REQUEST, log_step_failure,
                                       request_failure_message)
from agentserve.engine.output import InflightStep
from agentserve.engine.scheduler import SchedulerOutput
from agentserve.errors import FailureKind
from agentserve.lora.adapter import LoRAAdapterError
from agentserve.lora.key import LoRAKey
from agentserve.request import Request
from agentserve.worker.launched_step import LaunchedStep
from agentserve.worker.model_runner import ScheduledChunk

if TYPE_CHECKING:
    from agentserve.engine.engine import Engine


def launch_step(engine: "Engine", sched: SchedulerOutput, prev: Optional[InflightStep]) -> Optional[InflightStep]:
    """Turns the scheduler's output into rows and launches them; the rows' tokens count as computed
    from here on (later steps queue behind this one on the device)."""
    now = time.monotonic()
    chunks = []
    newest: list[Request] = []  # admitted for the first time in this step
    num_scheduled = sched.num_scheduled_tokens
    for req in sched.scheduled:
        n = num_scheduled[req.request_id]
        spec = sched.spec_token_ids.get(req.request_id, [])
        # A row samples when it reaches the end of the known tokens: once, plus once per
        # speculative token it verifies.
        sample = req.num_computed_tokens + n >= len(req.all_token_ids) + req.num_output_placeholders
        chunks.append(ScheduledChunk(req, n, 1 + len(spec) if sample else 0, spec))
        if req.timing.first_scheduled is None:
            req.timing.first_scheduled = now
            newest.append(req)
    chunks = _without_unreadable_adapters(engine, chunks)
    if not chunks:  # every row failed alone; the step's page copies and swaps still run
        engine.runner.execute_idle_device_ops(sched.device_ops)
        return None
    chunks, handle = _launch_isolating_failures(engine, chunks, sched.device_ops, prev, newest)
    if handle is None:
        return None
    # Rows with speculative tokens append a number of tokens known only on the host, so the next
    # step is scheduled after this one is processed (the synchronous order). Decided in the same
    # pass as the bookkeeping below (neither changes what the other reads).
    overlappable = True
    kv = engine.kv
    block_size = kv.block_size
    for chunk in chunks:
        req = chunk.request
        if req.is_finished:
            # Finished while this step was launching (the step before it, processed early for the
            # grammar masks, ended it): the row computes in vain and its pages are already freed.
            continue
        if overlappable and chunk.num_sampled and (chunk.spec_token_ids or engine.needs_host_tokens(req)):
            overlappable = False
        if req.num_computed_tokens < req.num_prompt_tokens:
            # Prefilled = prompt positions actually run through the model (cache misses, recomputes).
            prompt_part = min(chunk.num_tokens, req.num_prompt_tokens - req.num_computed_tokens)
            req.num_prefilled_tokens += prompt_part
            engine.metrics.prefilled_tokens_total += prompt_part
        # The KV of these tokens is written by the launched step: later steps (queued behind it on
        # the device) may rely on it, so they count as computed from now on.
        req.num_computed_tokens += chunk.num_tokens
        if req.num_computed_tokens // block_size > req.num_registered_blocks:  # a page may have filled
            kv.cache_full_blocks(req)
        if chunk.num_sampled:
            req.num_output_placeholders += 1  # one per row: update_from_output takes it back
    if engine.constraints is not None:
        for req, error, kind in engine.constraints.take_mask_failures():
            engine.output.fail_request(req, error, kind)
    return InflightStep(chunks, handle, overlappable)


def _without_unreadable_adapters(engine: "Engine", chunks: list[ScheduledChunk]) -> list[ScheduledChunk]:
    """The chunks whose LoRA weights can be put in a slot. An adapter out of its slot and out of the
    CPU tier (unloaded with drain while a session or request still uses it, or evicted from the tier)
    is read again from its directory; when that fails (the directory was removed or changed since),
    its requests fail alone here, with the reason. Inside the launch the failure could not be traced
    to them, and every request admitted in the step would fail with it."""
    manager = engine.runner.lora_manager
    if manager is None:
        return chunks
    unreadable: dict[LoRAKey, LoRAAdapterError] = {}
    for key in dict.fromkeys(c.request.lora_key for c in chunks if c.request.lora_key is not None):
        try:
            manager.ensure_weights(key)
        except LoRAAdapterError as e:
            unreadable[key] = e
    if not unreadable:
        return chunks
    kept = []
    for chunk in chunks:
        req = chunk.request
        error = unreadable.get(req.lora_key) if req.lora_key is not None else None
        if error is None:
            kept.append(chunk)
            continue
        where = (f"reading LoRA adapter {req.lora_name!r} again from its directory (its weights had left memory; "
                 "load it again and retry, or start a new session)")
        # Not the server's fault: the adapter the request names can no longer be served as loaded, and the
        # message says what to do (a 400 / INVALID_ARGUMENT, as for an adapter that is not loaded).
        engine.output.fail_request(req, request_failure_message(where, req, error), FailureKind.INVALID_REQUEST)
    return kept


def _launch_isolating_failures(engine: "Engine", chunks: list[ScheduledChunk], device_ops: list[DeviceOp],
                               prev: Optional[InflightStep], newest: list[Request]
                               ) -> tuple[list[ScheduledChunk], Optional[LaunchedStep]]:
    """Launches the step. A failure that no request can be blamed for is retried once without
    the requests admitted in this step (the likeliest cause: everything else ran before), which
    fail alone; if the retry fails too, the whole batch fails. Returns the chunks launched."""
    mask_fn = _grammar_mask_fn(engine, prev)
    prev_handle = prev.handle if prev is not None else None
    try:
        return chunks, engine.runner.launch(chunks, device_ops, mask_fn, prev_handle)
    except Exception as e:  # noqa: BLE001 - contained below, one request or one batch at a time
        log_step_failure("step launch", e, [c.request.request_id for c in chunks])
    suspects = set(map(id, newest))
    kept = [c for c in chunks if id(c.request) not in suspects]
    for req in newest:
        engine.output.fail_request(req, STEP_FAILED_FOR_NEW_REQUEST)
    if kept and len(kept) < len(chunks):
        try:
            # The first launch ran (and took off the list) the device ops it got to: none repeat.
            return kept, engine.runner.launch(kept, device_ops, mask_fn, prev_handle)
        except Exception as e:  # noqa: BLE001
            log_step_failure("step launch retry", e, [c.request.request_id for c in kept])
    for chunk in kept:
        engine.output.fail_request(chunk.request, STEP_FAILED)
    return [], None


def _grammar_mask_fn(engine: "Engine", prev: Optional[InflightStep]) -> Optional[Callable[..., Any]]:
    """The step's grammar-mask builder, which the runner calls after queuing the forward. With async
    scheduling the step before (prev) is still unprocessed at that point, and its sampled tokens are
    what advances the matchers: so it is processed right there, first. Reading its tokens, accepting
    them in the matchers and filling the masks then overlap this step's forward on the device,
    instead of running before the step is even scheduled (SGLang turns its overlap off for grammar
    batches; this keeps it). The engine's own call for prev afterwards returns the same outputs."""
    constraints = engine.constraints
    if constraints is None:
        return None
    if prev is None:
        return constraints.fill_bitmask

    def fill_after_prev(requests: list[Request], draft_token_ids: Optional[list[list[int]]] = None) -> Any:
        if any(r.grammar is not None for r in requests):
            engine.output.update_from_output(prev)
        return constraints.fill_bitmask(requests, draft_token_ids)
    return fill_after_prev
