"""How full the scheduler keeps the batch in the multi-LoRA throughput workload (issue #13), on any device.

benchmarks/lora.py's 512-adapter case (1,024 requests, prompts 64-512, 256 output tokens, every adapter
serving 2 requests, max_loras 64, max_num_seqs 256) can run at most 2 x 64 = 128 rows at a time, and each
adapter holds its slot for >= 256 decode steps, so its decode needs >= 512 x 256 / 64 = 2,048 steps where
the base model needs 1,024. Whether the scheduler reaches that bound (rows per step, step count) does not
depend on the device's speed, so a tiny model on the CPU measures it: the same workload shape, the same
engine limits and the same admission code. The step counts, with the H200's step times at 128 and 256 rows,
then split lora.py's measured ratio into the schedule's share and the LoRA kernels' share.

  python benchmarks/lora_schedule.py                      (the full workload on a tiny model: ~8 min on 2 cores)
  python benchmarks/lora_schedule.py --smoke --out x.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import append_result, command_line, device_name, write_json  # noqa: E402
from lora import table, write_adapter, load_adapters  # noqa: E402
from step_timeline import StepTimeline  # noqa: E402
from throughput import make_prompts  # noqa: E402

from agentserve import SamplingParams  # noqa: E402
from agentserve.llm import LLM  # noqa: E402
from agentserve.lora.adapter import ATTENTION_MODULES  # noqa: E402
from agentserve.testing import tiny_model_cached  # noqa: E402


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-requests", type=int, default=1024)
    ap.add_argument("--min-prompt", type=int, default=64)
    ap.add_argument("--max-prompt", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--adapters", type=int, default=512)
    ap.add_argument("--max-loras", type=int, default=64)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--smoke", action="store_true", help="a few short requests")
    ap.add_argument("--out", default=None)
    ap.add_argument("--record", action="store_true", help="append a line to benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    if args.smoke:
        args.num_requests, args.min_prompt, args.max_prompt, args.output_len = 16, 8, 24, 6
        args.adapters, args.max_loras, args.max_num_seqs = 8, 2, 8
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    targets = list(ATTENTION_MODULES)
    llm = LLM(str(tiny_model_cached("qwen2")), device="cpu", dtype="float32",
              max_model_len=args.max_prompt + args.output_len + 16, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, enable_lora=True, max_loras=args.max_loras,
              max_lora_rank=4, max_cpu_loras=args.adapters, lora_target_modules=targets)
    timeline = StepTimeline()
    uninstall = timeline.install()
    prompts = make_prompts(args.num_requests, args.min_prompt, args.max_prompt, llm.engine.arch.vocab_size, 0)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="lora-schedule-") as tmp:
        files = [write_adapter(Path(tmp) / f"a{i}", llm.engine.arch, 4, targets, seed=i) for i in range(4)]
        names = [f"lora-{i}" for i in range(args.adapters)]
        load_adapters(llm, names, files)
        rng = np.random.default_rng(1)
        for label, k in (("base", 0), (f"{args.adapters} adapters", args.adapters)):
            # As lora.py: every adapter serves the same number of requests (+-1), in a random order.
            adapters = [names[int(i) % k] for i in rng.permutation(len(prompts))] if k else [None] * len(prompts)
            timeline.take()  # the steps before this run
            start = time.perf_counter()
            outs = llm.generate(prompts, params, adapter=adapters)
            runs[label] = {**timeline.take(), "wall_s": time.perf_counter() - start,
                           "output_tokens": sum(len(o.outputs[0].token_ids) for o in outs)}
    uninstall()
    llm.close()
    per_adapter = -(-args.num_requests // args.adapters)
    max_rows = min(args.max_num_seqs, args.max_loras * per_adapter)
    # Each adapter holds a slot for >= output_len decode steps; max_loras slots at a time.
    bound = -(-args.adapters // args.max_loras) * args.output_len
    result = {"benchmark": "lora_schedule", "device": device_name(), "config": vars(args), "runs": runs,
              "max_rows_with_adapters": max_rows, "decode_steps_bound_with_adapters": bound}
    rows = [("run", "steps", "decode-only steps", "rows per decode-only step", "bound")]
    for label, r in runs.items():
        limit = f"{max_rows} rows, >= {bound} steps" if label != "base" else f"{args.max_num_seqs} rows"
        rows.append((label, str(r["steps"]), str(r["decode_only_steps"]), f"{r['decode_rows_per_decode_only_step']:.1f}",
                     limit))
    print(table(rows))
    write_json(result, args.out, "lora_schedule")
    if args.record:
        a = runs[f"{args.adapters} adapters"]
        append_result("lora_schedule", command_line("lora_schedule.py", argv),
                      f"base {runs['base']['steps']} steps (mean {runs['base']['decode_rows_per_decode_only_step']:.1f} decode "
                      f"rows); {args.adapters} adapters over max_loras {args.max_loras}: {a['steps']} steps "
                      f"(bound {bound} decode steps), mean {a['decode_rows_per_decode_only_step']:.1f} decode rows of {max_rows}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
