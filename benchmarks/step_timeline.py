"""Where a benchmark mode's wall time goes, step by step (diagnostic for issue #16's agent loop: the
sessions' p95 did not move when 3 s of swap work left the step's stream, so the stream's time is
not the whole story). Wraps ModelRunner.launch: per launched step, its scheduled tokens split into
prefill tokens, decode rows and the keys those rows attend to, and (on CUDA) events around the launch
on the step's stream, whose gaps are the device's idle time between steps; wraps Engine.step for the
scheduler's queue at each step. Read once per mode with take()."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch

from agentserve.engine.engine import Engine
from agentserve.worker.model_runner import ModelRunner


@dataclass
class _Step:
    host_start: float
    prefill_tokens: int
    decode_rows: int
    decode_context: int  # keys the decode rows attend to (their K and V read in every layer)
    events: Optional[tuple[torch.cuda.Event, torch.cuda.Event]]
    device_ops: int  # page copies and swaps queued before the forward
    host_launch_ms: float  # the host's time inside ModelRunner.launch (device ops included)
    host_ops_ms: float  # of which inside execute_device_ops
    # Recorded on the step's stream right after the device ops: splits the step's span into the ops'
    # part (their GPU work and any idle time while the host issued them) and the forward's.
    ops_end: Optional[torch.cuda.Event] = None
    period_ms: float = 0.0  # host time from the previous launch's end to this one's (set by take)


class StepTimeline:
    def __init__(self) -> None:
        self._steps: list[_Step] = []
        self._queues: list[tuple[float, int, int]] = []  # (time, running, waiting) at each engine step
        self._start = time.perf_counter()

    def install(self) -> Callable[[], None]:
        """Wraps ModelRunner.launch, ModelRunner.execute_device_ops and Engine.step; returns the undo."""
        launch, step, execute_ops = ModelRunner.launch, Engine.step, ModelRunner.execute_device_ops
        timeline = self
        # The launch in progress: (device ops seen, host ms in them, the event after them).
        current: dict[str, Any] = {}

        def timed_ops(runner: ModelRunner, ops: list[Any]) -> None:
            current["ops"] = current.get("ops", 0) + len(ops)
            t0 = time.perf_counter()
            execute_ops(runner, ops)
            current["ops_ms"] = current.get("ops_ms", 0.0) + (time.perf_counter() - t0) * 1e3
            if torch.cuda.is_available():
                current["ops_end"] = torch.cuda.Event(enable_timing=True)
                current["ops_end"].record()

        def timed_launch(runner: ModelRunner, chunks: list[Any], *args: Any, **kwargs: Any) -> Any:
            decoding = [c for c in chunks if c.num_tokens == 1 + len(c.spec_token_ids) and c.num_sampled]
            decode = len(decoding)
            prefill = sum(c.num_tokens for c in chunks) - decode
            # Before the launch's bookkeeping: computed tokens plus the row's own.
            context = sum(c.request.num_computed_tokens + c.num_tokens for c in decoding)
            events = None
            current.clear()
            t0 = time.perf_counter()
            if torch.cuda.is_available():
                events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                events[0].record()
            out = launch(runner, chunks, *args, **kwargs)
            if events is not None:
                events[1].record()
            now = time.perf_counter()
            timeline._steps.append(_Step(now, prefill, decode, context, events, current.get("ops", 0),
                                         (now - t0) * 1e3, current.get("ops_ms", 0.0), current.get("ops_end")))
            return out

        def queued_step(engine: Engine) -> Any:
            s = engine.scheduler
            timeline._queues.append((time.perf_counter(), s.num_running, s.num_waiting))
            return step(engine)

        ModelRunner.launch = timed_launch  # type: ignore[method-assign]
        ModelRunner.execute_device_ops = timed_ops  # type: ignore[method-assign]
        Engine.step = queued_step  # type: ignore[method-assign]

        def undo() -> None:
            ModelRunner.launch = launch  # type: ignore[method-assign]
            ModelRunner.execute_device_ops = execute_ops  # type: ignore[method-assign]
            Engine.step = step  # type: ignore[method-assign]
        return undo

    def take(self) -> dict[str, Any]:
        """Summary of the steps since the last take (synchronizes the device)."""
        steps, queues, start = self._steps, self._queues, self._start
        self._steps, self._queues, self._start = [], [], time.perf_counter()
        wall_ms = (self._start - start) * 1e3
        out: dict[str, Any] = {"steps": len(steps), "wall_ms": wall_ms}
        if not steps:
            return out
        for before, after in zip(steps, steps[1:]):
            after.period_ms = (after.host_start - before.host_start) * 1e3
        with_prefill = [s for s in steps if s.prefill_tokens]
        decode_only = [s for s in steps if not s.prefill_tokens]
        out.update(steps_with_prefill=len(with_prefill), decode_only_steps=len(decode_only),
                   prefill_tokens_per_prefill_step=sum(s.prefill_tokens for s in with_prefill) / max(1, len(with_prefill)),
                   decode_rows_per_step=sum(s.decode_rows for s in steps) / len(steps),
                   decode_rows_per_decode_only_step=sum(s.decode_rows for s in decode_only) / max(1, len(decode_only)),
                   # What a decode-only step's attention reads: the modes' steps compare at equal KV bytes.
                   decode_context_per_decode_only_step=sum(s.decode_context for s in decode_only) / max(1, len(decode_only)))
        if queues:
            out["mean_running"] = sum(q[1] for q in queues) / len(queues)
            out["mean_waiting"] = sum(q[2] for q in queues) / len(queues)
        timed = [s.events for s in steps if s.events is not None]
        if timed:
            torch.cuda.synchronize()
            # Busy: each step from its first queued work to its last on the stream; idle: the gaps.
            busy = sum(a.elapsed_time(b) for a, b in timed)
            span = timed[0][0].elapsed_time(timed[-1][1])
            prefill_ms = sum(s.events[0].elapsed_time(s.events[1]) for s in with_prefill if s.events is not None)
            out.update(device_span_ms=span, device_step_ms=busy, device_gap_ms=span - busy,
                       device_prefill_step_ms=prefill_ms, device_decode_only_step_ms=busy - prefill_ms)
            out["decode_only_by_device_ops"] = {
                "with_ops": _split(s for s in decode_only if s.device_ops),
                "without_ops": _split(s for s in decode_only if not s.device_ops)}
        return out


def _split(steps: Iterable[_Step]) -> dict[str, float]:
    """Mean per step: the span on the stream, its device-op part (GPU work plus idle while the host issued
    them) and forward part, keys read, and the host's time in the launch and in the ops."""
    chosen = [s for s in steps if s.events is not None]
    n = len(chosen)
    if not n:
        return {"steps": 0}
    ops_ms = sum(s.events[0].elapsed_time(s.ops_end) for s in chosen if s.events is not None and s.ops_end is not None)
    span_ms = sum(s.events[0].elapsed_time(s.events[1]) for s in chosen if s.events is not None)
    return {"steps": n, "span_ms": span_ms / n, "ops_part_ms": ops_ms / n, "forward_part_ms": (span_ms - ops_ms) / n,
            "keys": sum(s.decode_context for s in chosen) / n, "rows": sum(s.decode_rows for s in chosen) / n,
            "device_ops": sum(s.device_ops for s in chosen) / n,
            "host_launch_ms": sum(s.host_launch_ms for s in chosen) / n,
            "host_ops_ms": sum(s.host_ops_ms for s in chosen) / n,
            # Above the span: the host, not the device, set the pace of these steps.
            "host_period_ms": sum(s.period_ms for s in chosen) / n}


def describe(t: dict[str, Any]) -> str:
    if not t.get("steps"):
        return "no steps"
    text = (f"{t['steps']} steps ({t['steps_with_prefill']} with prefill, {t['prefill_tokens_per_prefill_step']:.0f} "
            f"prefill tokens each; {t['decode_only_steps']} decode-only, {t['decode_rows_per_decode_only_step']:.1f} "
            f"rows each over {t['decode_context_per_decode_only_step']:.0f} keys in all); queue: {t.get('mean_running', 0):.1f} running, {t.get('mean_waiting', 0):.1f} waiting")
    if "device_span_ms" in t:
        text += (f"; device: steps {t['device_step_ms']:.0f} ms (prefill steps {t['device_prefill_step_ms']:.0f}, "
                 f"decode-only {t['device_decode_only_step_ms']:.0f}), gaps between steps {t['device_gap_ms']:.0f} ms "
                 f"of {t['wall_ms']:.0f} ms wall")
        for name, part in t["decode_only_by_device_ops"].items():
            if part["steps"]:
                text += (f"\n    decode-only {name.replace('_', ' ')}: {part['steps']} steps, span {part['span_ms']:.2f} ms "
                         f"(ops {part['ops_part_ms']:.2f}, forward {part['forward_part_ms']:.2f}) over {part['keys']:.0f} keys, "
                         f"{part['rows']:.1f} rows; host: launch {part['host_launch_ms']:.2f} ms (ops {part['host_ops_ms']:.2f}), "
                         f"period {part['host_period_ms']:.2f} ms")
    return text
