"""Where the host's time goes in a decode step with grammar masks (diagnostic for issue #16's
grammar_step figure): the same workload as benchmarks/grammar_step.py, at one batch size, plain and
constrained, with wall-clock timers around the host functions of a step. `result (blocked)` is the
time the host waits for the device to hand a step's tokens back: near zero means the step is
host-bound (the device waits for the host), large means the device is the bottleneck.

  python benchmarks/grammar_host.py --model llama-3.1-8b --load-format dummy --dtype bfloat16 --batch 64
  python benchmarks/grammar_host.py --smoke          # CPU, tiny model, seconds
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import device_name, write_json  # noqa: E402
from grammar_step import measure, synthetic_tokenizer  # noqa: E402

from agentserve.engine.constraints import ConstraintManager  # noqa: E402
from agentserve.engine.output import OutputProcessor  # noqa: E402
from agentserve.engine.scheduler import Scheduler  # noqa: E402
from agentserve.grammar.state import GrammarBitmask  # noqa: E402
from agentserve.llm import LLM  # noqa: E402
from agentserve.sampling.sampler import Sampler  # noqa: E402
from agentserve.worker.launched_step import LaunchedStep  # noqa: E402
from agentserve.worker.model_runner import ModelRunner  # noqa: E402

# (class, method, label): nested timers overlap (update_from_output includes result's wait).
TIMED = [
    (Scheduler, "schedule", "schedule"),
    (ModelRunner, "prepare", "prepare inputs"),
    (ModelRunner, "launch", "launch (forward + masks + sampler)"),
    (ModelRunner, "_forward_logits", "  forward launch"),
    (ConstraintManager, "fill_bitmask", "  fill masks"),
    (GrammarBitmask, "_fill_rows", "    matcher fills"),
    (Sampler, "__call__", "  sampler launch"),
    (OutputProcessor, "update_from_output", "process a step's tokens"),
    (LaunchedStep, "result", "  result (blocked)"),
    (OutputProcessor, "_check_stop", "  stop checks + matcher accepts"),
]


def _timed(fn: Callable[..., Any], label: str, totals: dict[str, float]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[label] += time.perf_counter() - start
    return wrapper


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--smoke", action="store_true", help="CPU: tiny model, batch 4, 4 steps")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.smoke:
        args.model, args.batch, args.steps, args.prompt_len = None, 4, 4, 16
    tokenizer = None
    model = args.model
    if model is None:
        from agentserve.testing import tiny_model_cached

        model = str(tiny_model_cached("qwen2"))
    elif args.load_format == "dummy":
        tokenizer = str(synthetic_tokenizer(args.vocab, Path(tempfile.mkdtemp(prefix="agentserve-tok-"))))
    llm = LLM(model, dtype=args.dtype, load_format=args.load_format, tokenizer=tokenizer,
              max_num_seqs=max(args.batch, 2), max_model_len=args.prompt_len + args.steps + 64, async_scheduling=True)
    measure(llm, 2, True, args.prompt_len, 4)  # warm-up: compiles
    measure(llm, 2, False, args.prompt_len, 4)
    totals: dict[str, float] = collections.defaultdict(float)
    originals = [(cls, name, getattr(cls, name)) for cls, name, _ in TIMED]
    for (cls, name, label), (_, _, fn) in zip(TIMED, originals):
        setattr(cls, name, _timed(fn, label, totals))
    rows: dict[str, Any] = {}
    try:
        for constrained in (False, True):
            totals.clear()
            m = measure(llm, args.batch, constrained, args.prompt_len, args.steps)
            # measure() also runs the prefill steps; per decode step is approximate for those.
            steps = m["steps"]
            rows["constrained" if constrained else "plain"] = {
                "step_ms": m["step_ms"], "steps": steps,
                "host_ms_per_step": {label: totals[label] * 1000 / steps for _, _, label in TIMED}}
    finally:
        for cls, name, fn in originals:
            setattr(cls, name, fn)
    print(f"host time per decode step, batch {args.batch}, on {device_name()} (timers include the "
          "prefill steps of the window's requests, divided by the decode steps)")
    print(f"  {'':40}  {'plain':>8}  {'masked':>8}")
    print(f"  {'step (wall)':40}  {rows['plain']['step_ms']:>8.2f}  {rows['constrained']['step_ms']:>8.2f}")
    for _, _, label in TIMED:
        print(f"  {label:40}  {rows['plain']['host_ms_per_step'][label]:>8.2f}  "
              f"{rows['constrained']['host_ms_per_step'][label]:>8.2f}")
    write_json({"benchmark": "grammar_host", "device": device_name(), "batch": args.batch, "rows": rows},
               args.out, "grammar_host")
    return 0


if __name__ == "__main__":
    sys.exit(main())
