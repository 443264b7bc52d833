"""Where a decode step's time goes: wall time per step, GPU time of the forward (CUDA events),
and the host functions that dominate (cProfile), at a given batch size.

  python benchmarks/step_profile.py --model llama-3.1-8b --load-format dummy --dtype bfloat16 --batch 1
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time

import numpy as np
import torch

from agentserve import SamplingParams
from agentserve.llm import LLM


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=100)
    args = ap.parse_args()
    llm = LLM(args.model, dtype=args.dtype, load_format=args.load_format, max_model_len=2048, max_num_seqs=max(8, args.batch))
    engine = llm.engine
    rng = np.random.default_rng(0)
    for i in range(args.batch):
        engine.add_request(f"p{i}", rng.integers(10, 30000, size=128).tolist(),
                           SamplingParams(temperature=0.0, max_tokens=args.steps * 3, ignore_eos=True))
    for _ in range(5):
        engine.step()
    graphs = engine.runner.graphs
    gpu_ms: list[float] = []
    if graphs is not None:
        original = graphs.run

        def timed_run(*a, **kw):  # type: ignore[no-untyped-def]
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = original(*a, **kw)
            end.record()
            timed_run.events.append((start, end))  # type: ignore[attr-defined]
            return out

        timed_run.events = []  # type: ignore[attr-defined]
        graphs.run = timed_run  # type: ignore[method-assign]
    torch.cuda.synchronize()
    walls = []
    prof = cProfile.Profile()
    for _ in range(args.steps):
        t = time.perf_counter()
        prof.enable()
        engine.step()
        prof.disable()
        walls.append((time.perf_counter() - t) * 1000)
    torch.cuda.synchronize()
    if graphs is not None:
        gpu_ms = [s.elapsed_time(e) for s, e in timed_run.events]  # type: ignore[attr-defined]
    print(f"batch {args.batch}: wall {statistics.median(walls):.3f} ms/step, graph replay GPU "
          f"{statistics.median(gpu_ms) if gpu_ms else float('nan'):.3f} ms/step")
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(18)
    print(s.getvalue()[-6000:])
    for rid in list(engine.groups):
        engine.abort(rid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
