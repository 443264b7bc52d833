"""AsyncEngine: the step loop on a background thread, an async stream per request.

The Engine is not thread-safe, so only the step thread touches it: callers hand it work (add, abort,
any callable) through a command queue that the thread drains before each step, and get results back
through futures. Cancelling a request's stream aborts the request and frees its pages.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import queue
import sys
import threading
import time
from typing import Any, AsyncGenerator, Callable, Optional, TypeVar

from agentserve.engine.engine import Engine, Prompt
from agentserve.engine.failures import STEP_FAILED, log_step_failure
from agentserve.errors import EngineDeadError, QueueFullError
from agentserve.outputs import RequestOutput
from agentserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

T = TypeVar("T")

# The interpreter's thread switch interval while a step thread runs (ms; 0 leaves the interpreter's).
# Every torch call the step thread makes releases the GIL, and while the event loop (HTTP / gRPC, the
# streams) holds it, the step thread waits up to the switch interval (CPython's 5 ms) to get it back,
# inside the launch of a step the GPU may be waiting for. At 0.5 ms, on an H100's agent loop (64
# agents, sessions mode, benchmarks/NOTES.md twenty-third session): the swaps' host time 2.08 -> 1.16 s,
# wall 36.5 -> 33.5 s, p95 6.2 -> 5.9 s; the stateless mode's p95 unchanged (16.4 / 16.3 s).
SWITCH_INTERVAL_MS = float(os.environ.get("AGENTSERVE_SWITCH_INTERVAL_MS", "0.5"))

# How long the step thread naps after a step that ran nothing while requests wait (a swap in's copy in
# flight): the most such a copy's arrival is noticed late, against a core spent spinning on step().
IDLE_STEP_NAP_S = 0.001


def shorten_switch_interval(ms: float = SWITCH_INTERVAL_MS) -> None:
    """Lowers sys.setswitchinterval to `ms` (never raises it: a process that set less keeps its own)."""
    if ms > 0 and ms / 1e3 < sys.getswitchinterval():
        sys.setswitchinterval(ms / 1e3)


class EngineStepError(RuntimeError):
    """A step failed in a way no single request could be blamed for; the request was stopped."""


class _Stream:
    def __init__(self, loop: asyncio.AbstractEventLoop, num_sequences: int = 1) -> None:
        self.loop = loop
        self.num_sequences = num_sequences  # the request's n: what it costs the queue bound
        self.queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

    def put(self, item: RequestOutput | BaseException) -> None:
        deliver(self.loop, [(self.queue, item)])


Delivery = list[tuple["asyncio.Queue[RequestOutput | BaseException]", "RequestOutput | BaseException"]]


def _put_all(items: Delivery) -> None:
    for q, item in items:
        q.put_nowait(item)


def deliver(loop: asyncio.AbstractEventLoop, items: Delivery) -> None:
    """Hands items to their streams' queues on the streams' event loop, in one callback: each
    call_soon_threadsafe writes the loop's wake-up pipe, and every write lets the event loop take the
    GIL from the step thread (which may then wait up to the switch interval, 5 ms, to get it back)
    while it is launching the next step. A closed loop has no consumer left: its items are dropped
    rather than stopping the step thread."""
    try:
        loop.call_soon_threadsafe(_put_all, items)
    except RuntimeError:  # the loop was closed: its requests' consumers are gone
        logger.warning("dropped %d outputs for a closed event loop", len(items))


class AsyncEngine:
    def __init__(self, engine: Engine, max_pending: Optional[int] = None) -> None:
        self.engine = engine
        self.max_pending = max_pending or engine.config.scheduler.max_waiting
        self._commands: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future]] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._wake = threading.Event()
        self._stopping = False
        shorten_switch_interval()
        self._thread = threading.Thread(target=self._loop, name="agentserve-step", daemon=True)
        self._thread.start()

    @classmethod
    def from_kwargs(cls, model: str, **kwargs: Any) -> "AsyncEngine":
        return cls(Engine.from_kwargs(model, **kwargs))

    # --- running things on the step thread --------------------------------------------------------
    def is_running(self) -> bool:
        """Whether the step thread is up and not shutting down (what /health reports), and no
        tensor-parallel rank has failed or exited (the model cannot run without it)."""
        parallel = self.engine.runner.parallel
        return self._thread.is_alive() and not self._stopping and (parallel is None or parallel.is_healthy())

    def call_soon(self, fn: Callable[[], T]) -> "concurrent.futures.Future[T]":
        if self._stopping:
            raise EngineDeadError("the engine is shutting down")
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._commands.put((fn, fut))
        self._wake.set()
        return fut

    async def run(self, fn: Callable[[], T]) -> T:
        """Runs fn on the step thread (between steps) and returns its result."""
        return await asyncio.wrap_future(self.call_soon(fn))

    def _drain_commands(self) -> None:
        while True:
            try:
                fn, fut = self._commands.get_nowait()
            except queue.Empty:
                return
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - delivered to the caller
                fut.set_exception(e)

    def _loop(self) -> None:
        while not self._stopping:
            self._drain_commands()
            # Ops that sessions queued (swaps) run promptly even when no request is left to step.
            if not self.engine.has_unfinished() and not self.engine.scheduler.has_device_ops():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # noqa: BLE001 - a failed step fails its requests, not the server
                # The engine fails what it can trace to one request (or one batch) itself; what
                # reaches here cannot be traced, so every request still held fails.
                self._fail_all(e)
                continue
            self._publish(outputs)
            if self.engine.last_step_idle:
                # The queue waits on something outside the step (a swap in's copy): poll it every
                # IDLE_STEP_NAP_S, not in a tight loop that holds a core and the GIL; a command wakes it.
                self._wake.wait(timeout=IDLE_STEP_NAP_S)
                self._wake.clear()
        self._drain_commands()

    def _publish(self, outputs: list[RequestOutput]) -> None:
        """The step's outputs to their streams: one hand-over per event loop, not one per request."""
        by_loop: dict[asyncio.AbstractEventLoop, Delivery] = {}
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                by_loop.setdefault(stream.loop, []).append((stream.queue, out))
            if out.finished:
                self._streams.pop(out.request_id, None)
        for loop, items in by_loop.items():
            deliver(loop, items)

    def _fail_all(self, error: Exception) -> None:
        """Every request fails with the same generic error: the exception's text may quote one
        request's data (a prompt, a grammar), so it goes nowhere but the type into the log."""
        request_ids = list(self.engine.groups)
        log_step_failure("engine step", error, request_ids)
        for rid in request_ids:
            try:
                self.engine.abort(rid)
            except Exception as e:  # noqa: BLE001 - the others must still be told
                log_step_failure(f"abort of {rid}", e, [rid])
            stream = self._streams.pop(rid, None)
            if stream is not None:
                stream.put(EngineStepError(STEP_FAILED))

    # --- requests -------------------------------------------------------------------------------------
    @property
    def num_pending(self) -> int:
        """Sequences in flight: a request counts its n (vLLM V1 fans n out into n requests), so a few
        requests of large n cannot hold many times the queue bound."""
        return sum(stream.num_sequences for stream in self._streams.values())

    async def generate(self, request_id: str, prompt: Prompt, params: Optional[SamplingParams] = None,
                       **kwargs: Any) -> AsyncGenerator[RequestOutput, None]:
        """Streams RequestOutputs (cumulative text plus deltas) until the request finishes. Leaving
        the iteration early (break, cancellation, client gone) aborts the request."""
        parallel = self.engine.runner.parallel
        if parallel is not None and not parallel.is_healthy():
            # Every step would fail: refused as unavailable, not admitted to fail as an internal error.
            raise EngineDeadError("a tensor-parallel rank has failed, so the model cannot run; the server must be "
                                  "restarted (its log names the rank)")
        num_sequences = params.n if params is not None else 1
        pending = self.num_pending
        if pending + num_sequences > self.max_pending:
            raise QueueFullError(f"the server has {pending} sequences in flight and this request adds {num_sequences} "
                                 f"(limit {self.max_pending})")
        kwargs.setdefault("arrival_time", time.monotonic())  # vLLM's arrival: before the hop to the step thread
        stream = _Stream(asyncio.get_running_loop(), num_sequences)
        self._streams[request_id] = stream

        def add() -> None:
            self.engine.add_request(request_id, prompt, params, **kwargs)

        try:
            await self.run(add)
        except BaseException as e:
            self._streams.pop(request_id, None)
            if isinstance(e, asyncio.CancelledError) and not self._stopping:
                # Cancelled while the add was queued or running: it may have gone in already (a
                # running concurrent future cannot be cancelled), so take the request back out.
                self.call_soon(lambda: self.engine.abort(request_id))
            raise
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self._streams.pop(request_id, None)
                self.call_soon(lambda: self.engine.abort(request_id))

    async def abort(self, request_id: str) -> bool:
        self._streams.pop(request_id, None)
        return await self.run(lambda: self.engine.abort(request_id))

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stops the step thread, then releases the engine's device memory, swap space and grammar
        workers (Engine.close). Idempotent. If the thread does not stop within `timeout` (a step
        stuck on the device), the engine is left as it is: freeing it under a running step would
        crash that step."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.error("the step thread did not stop within %.0f s; the engine keeps its memory", timeout)
            return
        self.engine.close()
