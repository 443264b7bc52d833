"""Host time per engine step, split into phases, for a batch of decoding requests:

  schedule   Scheduler.schedule
  prepare    ModelRunner.prepare + build_sampling_metadata (numpy inputs, host-to-device copies)
  forward    queuing the forward (graph replay or eager kernels) and sampling, prepare excluded
  sync       LaunchedStep.result: waiting for the sampled ids (the device's time shows up here when
             the host is ahead of it)
  post       appending tokens, stop checks, detokenizing, building outputs (OutputProcessor.update_from_output
             minus the sync, plus OutputProcessor.collect_outputs)
  other      the rest of Engine.step

On CPU the forward is synchronous and includes the model's compute; on CUDA it is launch time only.

  python benchmarks/step_phases.py --tiny llama --batch 64 256                        # CPU, tiny model
  python benchmarks/step_phases.py --model llama-3.1-8b --load-format dummy --dtype bfloat16 --batch 1 64

With --async-scheduling both, the two modes run one after the other in this process: the first
engine is closed (LLM.close(): KV pool, CUDA graphs, weights) before the second is built, whose KV
pool is sized to fill the GPU again.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import command_line, device_name, write_json  # noqa: E402

from agentserve import SamplingParams  # noqa: E402
from agentserve.llm import LLM  # noqa: E402
from agentserve.worker import launched_step, model_runner  # noqa: E402

PHASES = ("schedule", "prepare", "forward", "sync", "post", "other")


class PhaseTimer:
    """Accumulates inclusive wall time of wrapped callables by name."""

    def __init__(self) -> None:
        self.total: dict[str, float] = defaultdict(float)

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.total[name] += time.perf_counter() - t
        return timed

    def reset(self) -> None:
        self.total.clear()


def instrument(llm: LLM, timer: PhaseTimer) -> Callable[[], None]:
    """Wraps the phases' callables; returns what undoes the wraps of module and class attributes (they
    outlive the engine: a second engine in this process would otherwise be timed through both wraps)."""
    engine, runner = llm.engine, llm.engine.runner
    engine.scheduler.schedule = timer.wrap("schedule", engine.scheduler.schedule)  # type: ignore[method-assign]
    runner.prepare = timer.wrap("prepare_inputs", runner.prepare)  # type: ignore[method-assign]
    runner.launch = timer.wrap("launch", runner.launch)  # type: ignore[method-assign]
    engine.output.update_from_output = timer.wrap("process", engine.output.update_from_output)  # type: ignore[method-assign]
    engine.output.collect_outputs = timer.wrap("collect", engine.output.collect_outputs)  # type: ignore[method-assign]
    build_sampling_metadata, result = model_runner.build_sampling_metadata, launched_step.LaunchedStep.result
    model_runner.build_sampling_metadata = timer.wrap("prepare_sampling", build_sampling_metadata)
    launched_step.LaunchedStep.result = timer.wrap("sync", result)  # type: ignore[method-assign]

    def undo() -> None:
        model_runner.build_sampling_metadata = build_sampling_metadata
        launched_step.LaunchedStep.result = result  # type: ignore[method-assign]
    return undo


def phases_per_step(total: dict[str, float], step_s: float, steps: int) -> dict[str, float]:
    ms = {k: v * 1000 / steps for k, v in total.items()}
    prepare = ms.get("prepare_inputs", 0.0) + ms.get("prepare_sampling", 0.0)
    # The sync happens inside update_from_output (and, on the synchronous path, after launch returned).
    out = {"schedule": ms.get("schedule", 0.0), "prepare": prepare,
           "forward": ms.get("launch", 0.0) - prepare, "sync": ms.get("sync", 0.0),
           "post": ms.get("process", 0.0) - ms.get("sync", 0.0) + ms.get("collect", 0.0)}
    out["other"] = step_s * 1000 / steps - sum(out.values())
    out["step"] = step_s * 1000 / steps
    return out


def fill_decode_batch(llm: LLM, batch: int, steps: int, prompt_len: int, seed: int) -> None:
    """`batch` requests of random prompts that decode for longer than `steps`, prefilled (and 3
    decode steps run), so that the next steps are decode steps of the whole batch."""
    engine = llm.engine
    vocab = engine.arch.vocab_size
    rng = np.random.default_rng(seed)
    for i in range(batch):
        engine.add_request(f"b{batch}-{i}", rng.integers(10, min(vocab, 32000) - 10, size=prompt_len).tolist(),
                           SamplingParams(temperature=0.0, max_tokens=steps + 64, ignore_eos=True))
    while engine.scheduler.num_waiting or any(r.num_computed_tokens < r.num_prompt_tokens
                                              for r in engine.scheduler.running):
        engine.step()  # prefill everything first: only decode steps are measured
    for _ in range(3):
        engine.step()


def run_batch(llm: LLM, timer: PhaseTimer, batch: int, steps: int, prompt_len: int, seed: int) -> dict[str, float]:
    engine = llm.engine
    fill_decode_batch(llm, batch, steps, prompt_len, seed)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    timer.reset()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    result = phases_per_step(timer.total, elapsed, steps)
    for rid in list(engine.groups):
        engine.abort(rid)
    while engine._inflight is not None:  # drop the last launched step (all its requests are aborted)
        engine.step()
    return result


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="model directory or named shape (with --load-format dummy)")
    src.add_argument("--tiny", help="a tiny test architecture (agentserve.testing.tiny), e.g. llama")
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default=None)
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--async-scheduling", choices=["on", "off", "both"], default="both")
    ap.add_argument("--no-tokenizer", action="store_true",
                    help="drop the tokenizer (as with dummy named shapes): no detokenization")
    ap.add_argument("--out", default=None)
    return ap.parse_args(argv)


def measure_mode(args: argparse.Namespace, model: str, async_scheduling: bool) -> list[dict[str, Any]]:
    """All batches with one engine, closed at the end so that the next mode's engine fits."""
    with LLM(model, device=args.device, dtype=args.dtype, load_format=args.load_format,
             max_model_len=args.prompt_len + args.steps + 128, max_num_seqs=max(args.batch),
             max_num_batched_tokens=max(2048, args.prompt_len * 8), async_scheduling=async_scheduling) as llm:
        llm.engine.emit_unfinished = False  # as the offline API and the throughput benchmark
        if args.no_tokenizer:
            llm.engine.tokenizer = None
        timer = PhaseTimer()
        undo = instrument(llm, timer)
        try:
            rows = []
            for batch in args.batch:
                r = run_batch(llm, timer, batch, args.steps, args.prompt_len, seed=batch)
                # The KV pool's size: the same in both modes when the first engine's memory came back.
                rows.append({"async_scheduling": async_scheduling, "batch": batch,
                             "kv_pages": llm.engine.pool.num_blocks,
                             **{k: round(v, 4) for k, v in r.items()}})
        finally:
            undo()
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    model = args.model
    if args.tiny:
        from agentserve.testing import tiny_model_cached

        model = str(tiny_model_cached(args.tiny))
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.async_scheduling]
    rows = [row for async_scheduling in modes for row in measure_mode(args, model, async_scheduling)]
    pages = {("on" if row["async_scheduling"] else "off"): row["kv_pages"] for row in rows}
    print(f"device: {device_name()}   KV pages per engine: "
          + ", ".join(f"async {mode} {n}" for mode, n in pages.items()))
    print("ms per decode step (host wall time by phase)")
    print(f"{'async':>5} {'batch':>5} " + " ".join(f"{p:>9}" for p in (*PHASES, "step")))
    for row in rows:
        print(f"{'on' if row['async_scheduling'] else 'off':>5} {row['batch']:>5} "
              + " ".join(f"{row[p]:9.3f}" for p in (*PHASES, "step")))
    write_json({"command": command_line("step_phases.py", argv), "device": device_name(), "rows": rows},
               args.out, "step_phases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
