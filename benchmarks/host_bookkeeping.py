"""Median host time per decode step of the per-request bookkeeping (issue #16), step by step:

  schedule     Scheduler.schedule
  step_inputs  build_step_inputs (flat ids, positions, slots, block tables; host-to-device copies)
  launch_rows  launch_step less ModelRunner.launch (rows from the schedule, computed counts, placeholders)
  result       LaunchedStep.result (waiting for the sampled ids, splitting them into rows)
  update       OutputProcessor.update_from_output less LaunchedStep.result (appends, stop checks)
  collect      OutputProcessor.collect_outputs

step_phases.py reports means over all steps by coarser phases; this reports medians, which a loaded
machine disturbs less, of the phases the bookkeeping lives in. The forward is not counted (on CUDA
`result` includes the wait for the device).

  python benchmarks/host_bookkeeping.py --tiny llama --batch 256 --steps 100
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional


sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import command_line, device_name, write_json  # noqa: E402
from step_phases import PhaseTimer, fill_decode_batch  # noqa: E402

from agentserve.engine import engine as engine_module  # noqa: E402
from agentserve.llm import LLM  # noqa: E402
from agentserve.worker import launched_step, model_runner  # noqa: E402

PHASES = ("schedule", "step_inputs", "launch_rows", "result", "update", "collect")


def instrument(llm: LLM, timer: PhaseTimer) -> Any:
    """Wraps the phases' callables; returns what undoes the module-level wraps."""
    engine = llm.engine
    engine.scheduler.schedule = timer.wrap("schedule", engine.scheduler.schedule)  # type: ignore[method-assign]
    engine.runner.launch = timer.wrap("runner_launch", engine.runner.launch)  # type: ignore[method-assign]
    engine.output.update_from_output = timer.wrap("update_all", engine.output.update_from_output)  # type: ignore[method-assign]
    engine.output.collect_outputs = timer.wrap("collect", engine.output.collect_outputs)  # type: ignore[method-assign]
    saved = (model_runner.build_step_inputs, engine_module.launch_step, launched_step.LaunchedStep.result)
    model_runner.build_step_inputs = timer.wrap("step_inputs", saved[0])
    engine_module.launch_step = timer.wrap("launch_all", saved[1])
    launched_step.LaunchedStep.result = timer.wrap("result", saved[2])  # type: ignore[method-assign]

    def undo() -> None:
        model_runner.build_step_inputs, engine_module.launch_step = saved[0], saved[1]
        launched_step.LaunchedStep.result = saved[2]  # type: ignore[method-assign]
    return undo


def step_phases(total: dict[str, float]) -> dict[str, float]:
    ms = {k: v * 1000 for k, v in total.items()}
    return {"schedule": ms.get("schedule", 0.0), "step_inputs": ms.get("step_inputs", 0.0),
            "launch_rows": ms.get("launch_all", 0.0) - ms.get("runner_launch", 0.0),
            "result": ms.get("result", 0.0), "update": ms.get("update_all", 0.0) - ms.get("result", 0.0),
            "collect": ms.get("collect", 0.0)}


def run_batch(llm: LLM, timer: PhaseTimer, batch: int, steps: int, prompt_len: int) -> dict[str, float]:
    engine = llm.engine
    fill_decode_batch(llm, batch, steps, prompt_len, seed=batch)
    per_step: list[dict[str, float]] = []
    for _ in range(steps):
        timer.reset()
        engine.step()
        per_step.append(step_phases(timer.total))
    for rid in list(engine.groups):
        engine.abort(rid)
    while engine._inflight is not None:
        engine.step()
    out = {p: statistics.median(s[p] for s in per_step) for p in PHASES}
    out["total"] = sum(out.values())
    return out


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", default="llama", help="a tiny test architecture (agentserve.testing.tiny)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, nargs="+", default=[256])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--async-scheduling", choices=["on", "off"], default="on")
    ap.add_argument("--with-tokenizer", action="store_true", help="keep the tokenizer (detokenize every token)")
    ap.add_argument("--out", default=None)
    return ap.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    from agentserve.testing import tiny_model_cached

    model = str(tiny_model_cached(args.tiny))
    rows = []
    with LLM(model, device=args.device, max_model_len=args.prompt_len + args.steps + 128, max_num_seqs=max(args.batch),
             max_num_batched_tokens=max(2048, args.prompt_len * max(args.batch)),
             async_scheduling=args.async_scheduling == "on") as llm:
        if not args.with_tokenizer:
            llm.engine.tokenizer = None
        timer = PhaseTimer()
        undo = instrument(llm, timer)
        try:
            for batch in args.batch:
                start = time.perf_counter()
                r = run_batch(llm, timer, batch, args.steps, args.prompt_len)
                rows.append({"batch": batch, "wall_s": round(time.perf_counter() - start, 2),
                             **{k: round(v, 4) for k, v in r.items()}})
        finally:
            undo()
    print(f"device: {device_name()}   async scheduling {args.async_scheduling}")
    print("median host ms per decode step")
    print(f"{'batch':>5} " + " ".join(f"{p:>11}" for p in (*PHASES, "total")))
    for row in rows:
        print(f"{row['batch']:>5} " + " ".join(f"{row[p]:11.3f}" for p in (*PHASES, "total")))
    write_json({"command": command_line("host_bookkeeping.py", argv), "device": device_name(), "rows": rows},
               args.out, "host_bookkeeping")
    return 0


if __name__ == "__main__":
    sys.exit(main())
