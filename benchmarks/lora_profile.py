"""Where a one-stream decode step with a LoRA adapter spends the time the base step does not (issue
#13: one stream with an adapter at 0.89x the base, target 0.90x). Two launch counts cut from the
adapter path (the shrink on a side stream, the shrink as rows of the base GEMV) moved nothing, so
this measures instead of guessing: the device's kernels per decode step (torch.profiler, device
activity only, kernels inside CUDA graph replays included), base request vs adapter request, and
the per-kernel difference, plus each run's device busy and idle time per step.

  python benchmarks/lora_profile.py                   # dummy Llama-3.1-8B, rank-16 q/k/v/o adapter
  python benchmarks/lora_profile.py --batch 128 --adapters 64   # the 512-adapter workload's step
  python benchmarks/lora_profile.py --smoke           # CPU, tiny model: the script's plumbing only
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_json  # noqa: E402
from lora import write_adapter  # noqa: E402
from spec_profile import _union_us  # noqa: E402

from agentserve import SamplingParams  # noqa: E402
from agentserve.llm import LLM  # noqa: E402
from agentserve.lora.adapter import ATTENTION_MODULES  # noqa: E402


def profile_batch(llm: LLM, prompts: list[list[int]], new_tokens: int,
                  adapters: list[Optional[str]]) -> dict[str, Any]:
    """Kernels per decode step of a batch (request i with adapters[i]; the prefill's kernels are a
    few among hundreds of steps' worth), device busy / idle per step."""
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    llm.generate(prompts, params, adapter=adapters)  # warm-up: compiles, graphs
    activities = [ProfilerActivity.CUDA] if torch.cuda.is_available() else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        llm.generate(prompts, params, adapter=adapters)
    wanted = DeviceType.CUDA if torch.cuda.is_available() else DeviceType.CPU
    device = [e for e in prof.events() if e.device_type == wanted]
    kernels: dict[str, list[float]] = defaultdict(list)
    for e in device:
        kernels[e.name[:80]].append(e.time_range.elapsed_us())
    steps = new_tokens
    start = min(e.time_range.start for e in device)
    end = max(e.time_range.end for e in device)
    busy = _union_us([(e.time_range.start, e.time_range.end) for e in device])
    return {"wall_us_per_step": (end - start) / steps, "busy_us_per_step": busy / steps,
            "idle_us_per_step": (end - start - busy) / steps,
            "kernels": {n: {"count_per_step": len(v) / steps, "us_per_step": sum(v) / steps} for n, v in kernels.items()}}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1, help="requests decoding together")
    ap.add_argument("--adapters", type=int, default=1,
                    help="distinct adapters over the batch (request i uses adapter i %% N), e.g. --batch 128 "
                         "--adapters 64: the step of the 512-adapter workload, whose slots cap it at 128 rows")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    kwargs: dict[str, Any] = dict(load_format="dummy", dtype="bfloat16", max_model_len=1024, max_num_seqs=8)
    if args.smoke:
        from agentserve.testing import tiny_model_cached

        args.model, args.rank, args.new_tokens = str(tiny_model_cached("llama")), 4, 8
        kwargs = dict(dtype="float32", max_model_len=256, max_num_seqs=4)
    kwargs["max_num_seqs"] = max(kwargs["max_num_seqs"], args.batch)
    targets = list(ATTENTION_MODULES)
    llm = LLM(args.model, enable_lora=True, max_loras=max(4, args.adapters), max_lora_rank=args.rank,
              lora_target_modules=targets, **kwargs)
    names = [f"a{i}" for i in range(args.adapters)]
    with tempfile.TemporaryDirectory(prefix="lora-profile-") as tmp:
        for i, name in enumerate(names):
            llm.load_adapter(name, str(write_adapter(Path(tmp) / name, llm.engine.arch, args.rank, targets, seed=i)))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(10, 100 if args.smoke else 20000, size=128).tolist() for _ in range(args.batch)]
    base = profile_batch(llm, prompts, args.new_tokens, [None] * args.batch)
    lora = profile_batch(llm, prompts, args.new_tokens, [names[i % args.adapters] for i in range(args.batch)])
    llm.close()
    print(f"{'per decode step':<20} {'base':>9} {'adapter':>9} {'diff':>9}")
    for key in ("wall_us_per_step", "busy_us_per_step", "idle_us_per_step"):
        print(f"{key:<20} {base[key]:9.1f} {lora[key]:9.1f} {lora[key] - base[key]:9.1f}")
    names = set(base["kernels"]) | set(lora["kernels"])
    zero = {"count_per_step": 0.0, "us_per_step": 0.0}
    diffs = sorted(((lora["kernels"].get(n, zero)["us_per_step"] - base["kernels"].get(n, zero)["us_per_step"], n)
                    for n in names), key=lambda d: -abs(d[0]))
    print(f"{'kernel':<80} {'base us':>8} {'lora us':>8} {'diff':>8} {'n base':>7} {'n lora':>7}")
    for diff, n in diffs[:30]:
        b, x = base["kernels"].get(n, zero), lora["kernels"].get(n, zero)
        print(f"{n:<80} {b['us_per_step']:8.1f} {x['us_per_step']:8.1f} {diff:8.1f} "
              f"{b['count_per_step']:7.1f} {x['count_per_step']:7.1f}")
    write_json({"model": args.model, "rank": args.rank, "batch": args.batch, "adapters": args.adapters, "base": base,
                "adapter": lora}, args.out, "lora_profile")
    return 0


if __name__ == "__main__":
    sys.exit(main())
