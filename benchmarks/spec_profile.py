"""Where a speculative single-stream iteration's time goes on the GPU: wall time per engine step, the
device's busy time (the union of its kernels and copies) and idle time per step, the host phases
that leave it idle, and the kernels that fill it (torch.profiler, one stream, synthetic acceptance).

benchmarks/spec.py measures the speedup; this says why it is below theory: the gap between
(1 + k c) target steps and the measured step is either device work beyond that model (the k + 1-token
verification, the catch-up) or host time on the critical path (a speculative step runs synchronously).

  python benchmarks/spec_profile.py --draft-quantization fp8 --k 4 --acceptance 0.8
  python benchmarks/spec_profile.py --smoke            # CPU, tiny models: the script's plumbing only
  python benchmarks/spec_profile.py --events ...       # no profiler: CUDA events between the phases
  python benchmarks/spec_profile.py --events --draft-kernels ...  # and the draft's 1- vs 2-token kernels

`--events` leaves out torch.profiler (which slows the host and so inflates the idle it measures) and
records a CUDA event on the stream where each bracketed phase starts and ends. Differences between
consecutive events are device time (work queued between them), or idle where the device reached the
later event only because the host recorded it late. Per verification it prints the verification's device
span (forward, logits, rejection sampling, the result's copy), the continuation's (the next proposal's
draft forwards), the gap from the continuation's end to the next verification's start (the device
waiting for the host's processing of the result), and the host's own time per phase.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_json  # noqa: E402
from spec import decode_forward, step_time_ms  # noqa: E402

from agentserve import SamplingParams  # noqa: E402
from agentserve.engine.output import OutputProcessor  # noqa: E402
from agentserve.engine.scheduler import Scheduler  # noqa: E402
from agentserve.engine.speculation import Speculation  # noqa: E402
from agentserve.llm import LLM  # noqa: E402
from agentserve.sampling.rejection import RejectionSampler  # noqa: E402
from agentserve.spec.draft import DraftModel  # noqa: E402
from agentserve.spec.draft_inputs import DraftRun, build_padded_inputs  # noqa: E402
from agentserve.worker.continuation_graphs import ContinuationGraphs  # noqa: E402
from agentserve.worker.model_runner import ModelRunner  # noqa: E402
from agentserve.worker.verify_graphs import VerifyGraphs  # noqa: E402

# Host phases: (class, method) wrapped in a profiler range of this name.
PHASES: list[tuple[type, str, str]] = [
    (DraftModel, "propose", "propose (draft)"),
    (Speculation, "after_launch", "continuation launch"),
    (Scheduler, "schedule", "schedule"),
    (ModelRunner, "launch", "verification launch"),
    (RejectionSampler, "__call__", "rejection sampling"),
    (OutputProcessor, "update_from_output", "update_from_output"),
]


def _wrap(cls: type, name: str, label: str, host_ranges: dict[str, list[float]]) -> Callable[[], None]:
    """Times the method with perf_counter (us): profiler CPU ranges would record every op inside
    (the first H200 run of this script slowed an iteration from ~9 to 54 ms that way)."""
    original = getattr(cls, name)

    def timed(self: Any, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            host_ranges[label].append((time.perf_counter() - t0) * 1e6)

    setattr(cls, name, timed)
    return lambda: setattr(cls, name, original)


EVENT_PHASES: list[tuple[type, str, str]] = [
    (ModelRunner, "launch", "verification"),
    (Speculation, "after_launch", "continuation"),
    (OutputProcessor, "update_from_output", "update_from_output"),
    (Speculation, "__call__", "adopt / propose"),
    (Scheduler, "schedule", "schedule"),
    (VerifyGraphs, "run", "verification graph (inputs + replay)"),
    (RejectionSampler, "__call__", "rejection sampling"),
    (ContinuationGraphs, "run", "continuation graph (inputs + replay)"),
]


def _wrap_events(cls: type, name: str, label: str, marks: list[tuple[str, str, Any, float]]) -> Callable[[], None]:
    """Records (label, "start" / "end", CUDA event, host perf_counter) around the method."""
    original = getattr(cls, name)

    def timed(self: Any, *args: Any, **kwargs: Any) -> Any:
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        marks.append((label, "start", start, time.perf_counter()))
        try:
            return original(self, *args, **kwargs)
        finally:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            marks.append((label, "end", end, time.perf_counter()))

    setattr(cls, name, timed)
    return lambda: setattr(cls, name, original)


def _summary(values: list[float]) -> dict[str, Any]:
    """Median, mean and the five largest (index in order of occurrence, us): a mean above the median
    comes from a few iterations (the first proposal, a host stall) or from all of them."""
    largest = sorted(enumerate(values), key=lambda iv: -iv[1])[:5]
    return {"n": len(values), "median": statistics.median(values), "mean": statistics.fmean(values),
            "largest": [(i, round(v, 1)) for i, v in largest]}


def _stream(llm: LLM, prompt: list[int], params: SamplingParams, per_step_outputs: bool) -> None:
    """One request to its end: llm.generate, or engine.step() with an output every step (as
    benchmarks/latency.py's single_stream drives it for spec.py)."""
    if not per_step_outputs:
        llm.generate([prompt], params)
        return
    engine = llm.engine
    engine.emit_unfinished = True
    try:
        engine.add_request(f"stream-{time.monotonic_ns()}", prompt, params)
        while engine.has_unfinished():
            engine.step()
    finally:
        engine.emit_unfinished = False


def _event_timeline(llm: LLM, prompt: list[int], params: SamplingParams, per_step_outputs: bool) -> dict[str, Any]:
    """Per verification: device spans between the phases' events, and the host's time per phase (us)."""
    marks: list[tuple[str, str, Any, float]] = []
    restore = [_wrap_events(cls, name, label, marks) for cls, name, label in EVENT_PHASES]
    steps_before = llm.engine.metrics.spec_num_drafts
    t0 = time.perf_counter()
    try:
        _stream(llm, prompt, params, per_step_outputs)
    finally:
        for undo in restore:
            undo()
    wall = time.perf_counter() - t0
    torch.cuda.synchronize()
    verifications = llm.engine.metrics.spec_num_drafts - steps_before
    host: dict[str, list[float]] = defaultdict(list)
    opened: dict[str, float] = {}
    for label, kind, _, t in marks:
        if kind == "start":
            opened[label] = t
        elif label in opened:
            host[label].append((t - opened.pop(label)) * 1e6)
    # Device spans: the verification's launch start -> end, its continuation's start -> end, and the
    # continuation's end -> the next verification's start (idle unless the host queued work between).
    # Every phase's own span (start -> end: the device time of the work it queued, while the host is ahead).
    spans: dict[str, list[float]] = defaultdict(list)
    last: dict[tuple[str, str], Any] = {}
    for label, kind, ev, _ in marks:
        if kind == "end" and (label, "start") in last and label not in ("verification", "continuation"):
            spans[label].append(last[(label, "start")].elapsed_time(ev) * 1e3)
        last[(label, kind)] = ev
    device_marks = [(label, kind, ev) for label, kind, ev, _ in marks if label in ("verification", "continuation")]
    last = {}
    for label, kind, ev in device_marks:
        if label == "verification" and kind == "start" and ("continuation", "end") in last:
            spans["continuation end -> next verification"].append(last[("continuation", "end")].elapsed_time(ev) * 1e3)
            spans["iteration (verification start -> next)"].append(
                last[("verification", "start")].elapsed_time(ev) * 1e3)
        if label == "continuation" and kind == "start" and ("verification", "end") in last:
            spans["verification end -> continuation"].append(last[("verification", "end")].elapsed_time(ev) * 1e3)
        if kind == "end":
            spans[label].append(last[(label, "start")].elapsed_time(ev) * 1e3)
        last[(label, kind)] = ev
    out: dict[str, Any] = {"verifications": verifications, "wall_us_per_verification": wall * 1e6 / max(1, verifications),
                           "device_us": {k: _summary(v) for k, v in spans.items() if v},
                           "host_us": {k: {"n": len(v), "median": statistics.median(v), "mean": statistics.fmean(v)}
                                       for k, v in host.items()}}
    print(f"events, per verification ({verifications}): wall {out['wall_us_per_verification']:.0f} us")
    for name, v in out["device_us"].items():
        print(f"  device {name}: median {v['median']:.0f} us, mean {v['mean']:.0f} us ({v['n']}); largest "
              + ", ".join(f"#{i} {t:.0f}" for i, t in v["largest"]))
    for name, v in out["host_us"].items():
        print(f"  host {name}: median {v['median']:.0f} us, mean {v['mean']:.0f} us ({v['n']})")
    return out


def _draft_forward_ms(llm: LLM, kernels: bool = False) -> dict[str, Any]:
    """The draft's forwards alone (graph replays, ms): a decode step (1 token) and the continuation's
    2-token catch-up, at position 128; with `kernels`, their kernels side by side (torch.profiler)."""
    draft = llm.engine.runner.draft
    assert draft is not None and draft.cache is not None and draft.catch_up_graphs is not None
    catch_up_graphs = draft.catch_up_graphs
    padded = build_padded_inputs([DraftRun([11, 12], 127, list(range(16)))], 2, draft.block_size, draft.max_model_len,
                                 draft.device)

    def catch_up() -> None:
        hidden = catch_up_graphs.run(padded, 2)
        draft.model.compute_logits(hidden.index_select(0, padded.last_index))

    decode = decode_forward(draft.model, draft.graphs, draft.cache.layers, draft.device)
    out = {"decode_1_token": step_time_ms(decode), "catch_up_2_tokens": step_time_ms(catch_up)}
    print("  draft forwards alone: " + ", ".join(f"{k} {v:.3f} ms" for k, v in out.items()))
    if kernels:
        out["kernels_us_per_forward"] = _kernel_diff({"decode_1_token": decode, "catch_up_2_tokens": catch_up})
    return out


def _kernel_diff(forwards: dict[str, Callable[[], None]], repeats: int = 20) -> list[dict[str, Any]]:
    """Each forward's kernels under torch.profiler (us per forward, by name), side by side, largest
    difference first: what a 2-token catch-up runs beyond a 1-token decode step."""
    per: dict[str, dict[str, float]] = {}
    for label, forward in forwards.items():
        forward()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(repeats):
                forward()
            torch.cuda.synchronize()
        sums: dict[str, float] = defaultdict(float)
        for e in prof.events():
            if e.device_type == DeviceType.CUDA:
                sums[e.name[:80]] += e.time_range.elapsed_us() / repeats
        per[label] = sums
    a, b = list(per)
    rows = [{"name": n, a: per[a].get(n, 0.0), b: per[b].get(n, 0.0)} for n in set(per[a]) | set(per[b])]
    rows.sort(key=lambda r: -abs(r[b] - r[a]))
    print(f"  kernels, us per forward: {a} total {sum(per[a].values()):.1f}, {b} total {sum(per[b].values()):.1f}")
    for r in rows[:30]:
        print(f"    {r[a]:8.1f} {r[b]:8.1f} {r[b] - r[a]:+8.1f}  {r['name']}")
    return rows


def _union_us(intervals: list[tuple[float, float]]) -> float:
    busy, end = 0.0, -1.0
    for s, e in sorted(intervals):
        if s > end:
            busy += e - s
            end = e
        elif e > end:
            busy += e - end
            end = e
    return busy


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--draft-model", default="llama-3.2-1b")
    ap.add_argument("--draft-quantization", default=None, choices=["fp8"])
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--acceptance", type=float, default=0.8)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--no-continuation", action="store_true",
                    help="proposals from the host after each verification (spec_device_continuation off)")
    ap.add_argument("--like-spec-py", action="store_true",
                    help="the engine spec.py builds (max_num_seqs 256, 8,192 batched tokens, k <= 6 captured, "
                    "k set per run)")
    ap.add_argument("--per-step-outputs", action="store_true",
                    help="engine.step() with an output every step, as spec.py's single stream runs")
    ap.add_argument("--events", action="store_true",
                    help="CUDA events between the phases instead of torch.profiler (GPU only; see the docstring)")
    ap.add_argument("--draft-kernels", action="store_true",
                    help="with --events: the draft's 1-token and 2-token forwards' kernels side by side")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.events and not torch.cuda.is_available():
        ap.error("--events times CUDA events: it needs a GPU")
    kwargs: dict[str, Any] = dict(load_format="dummy", dtype="bfloat16", max_model_len=2048, max_num_seqs=8)
    captured_k = args.k
    if args.like_spec_py:
        kwargs.update(max_num_seqs=256, max_num_batched_tokens=8192)
        captured_k = max(6, args.k)
    if args.smoke:
        from agentserve.testing import tiny_model_cached

        args.model, args.draft_model = str(tiny_model_cached("llama")), str(tiny_model_cached("llama", num_layers=1))
        kwargs = dict(dtype="float32", max_model_len=512, max_num_seqs=4)
        args.new_tokens = 16
    llm = LLM(args.model, draft_model=args.draft_model, draft_quantization=args.draft_quantization,
              num_speculative_tokens=captured_k, spec_dynamic=False, spec_synthetic_acceptance=args.acceptance,
              spec_device_continuation=not args.no_continuation, **kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
    prompt = np.random.default_rng(0).integers(10, 20000 if not args.smoke else 100, size=128).tolist()
    spec = llm.engine.spec_proposer
    assert isinstance(spec, Speculation)
    spec.max_num_tokens = args.k
    llm.generate([prompt], params)  # warm-up
    if args.events:
        timeline = _event_timeline(llm, prompt, params, args.per_step_outputs)
        timeline["draft_forward_ms"] = _draft_forward_ms(llm, args.draft_kernels)
        llm.close()
        write_json({"model": args.model, "draft": args.draft_model, "draft_quantization": args.draft_quantization,
                    "k": args.k, "acceptance": args.acceptance, "events": timeline}, args.out, "spec_events")
        return 0
    host_ranges: dict[str, list[float]] = defaultdict(list)
    restore = [_wrap(cls, name, label, host_ranges) for cls, name, label in PHASES]
    steps_before = llm.engine.metrics.spec_num_drafts
    # Device activity only: kernels and copies with their GPU timestamps, no per-op host records.
    activities = [ProfilerActivity.CUDA] if torch.cuda.is_available() else [ProfilerActivity.CPU]
    try:
        with profile(activities=activities) as prof:
            llm.generate([prompt], params)
    finally:
        for undo in restore:
            undo()
    verifications = llm.engine.metrics.spec_num_drafts - steps_before
    events = prof.events()
    device = [e for e in events if e.device_type == DeviceType.CUDA]
    kernels: dict[str, list[float]] = defaultdict(list)
    for e in device:
        kernels[e.name[:70]].append(e.time_range.elapsed_us())
    result: dict[str, Any] = {"model": args.model, "draft": args.draft_model, "draft_quantization": args.draft_quantization,
                              "k": args.k, "acceptance": args.acceptance, "verifications": verifications}
    if device:
        start = min(e.time_range.start for e in device)
        end = max(e.time_range.end for e in device)
        busy = _union_us([(e.time_range.start, e.time_range.end) for e in device])
        per = max(1, verifications)
        result.update(wall_us_per_verification=(end - start) / per, busy_us_per_verification=busy / per,
                      idle_us_per_verification=(end - start - busy) / per)
        print(f"per verification ({verifications}): wall {(end - start) / per:.0f} us, device busy {busy / per:.0f} us, "
              f"idle {(end - start - busy) / per:.0f} us")
    result["host_phases_us"] = {name: {"calls": len(v), "median": statistics.median(v), "total_per_verification":
                                       sum(v) / max(1, verifications)} for name, v in host_ranges.items()}
    for name, v in result["host_phases_us"].items():
        print(f"  host {name}: {v['calls']} calls, median {v['median']:.0f} us, {v['total_per_verification']:.0f} us "
              "per verification")
    top = sorted(kernels.items(), key=lambda kv: -sum(kv[1]))[:25]
    result["device_kernels"] = [{"name": n, "count": len(v), "total_us_per_verification": sum(v) / max(1, verifications),
                                 "mean_us": sum(v) / len(v)} for n, v in top]
    for k in result["device_kernels"]:
        print(f"  dev {k['total_us_per_verification']:8.1f} us/verif  {k['count']:6d} x {k['mean_us']:7.1f} us  {k['name']}")
    llm.close()
    write_json(result, args.out, "spec_profile")
    if args.out is None:
        print(json.dumps({k: v for k, v in result.items() if k != "device_kernels"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
