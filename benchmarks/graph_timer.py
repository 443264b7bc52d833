"""Device time of one kernel call, from a CUDA graph of many calls over weight copies larger than the L2
(benchmarks/fp8.py --parts gemv, benchmarks/gemv_rows.py)."""

from __future__ import annotations

import argparse
from typing import Any, Callable, Optional

import torch

# Weight copies per shape: at least this many bytes in all, 4x the H200's 50 MB L2 (the engine reads
# each layer's weights once per step, from HBM).
GEMV_WORKING_SET = 200 * 2**20


def time_us(fn: Any, arg_sets: list[tuple[Any, ...]], iters: int = 60, **kwargs: Any) -> float:
    """Device microseconds per call of fn, from a CUDA graph of `iters` calls: an eager loop would time
    the Python launch path (~20-30 us, more than these kernels take). The calls cycle through
    `arg_sets`, copies of the weights that together exceed the L2 cache, so each call reads HBM."""
    def calls() -> None:
        for i in range(iters):
            fn(*arg_sets[i % len(arg_sets)], **kwargs)

    return graph_replay_us(calls, reps=1) / iters


def graph_replay_us(fn: Callable[[], Any], reps: int = 10) -> float:
    """Device microseconds per replay of a CUDA graph capturing one call of fn (warmed and compiled by an
    eager call on a side stream first): a whole chain of kernels as the engine's decode graphs run it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compiles and autotunes outside the capture
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / reps


def parse_gpu_args(ap: argparse.ArgumentParser, argv: Optional[list[str]]) -> Optional[tuple[argparse.Namespace, list[int]]]:
    """The GEMV sweeps' command line (their `--rows`, comma-separated ints, and `--out` added here): (args,
    rows), or None after saying so where there is no GPU to time."""
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs CUDA")
        return None
    return args, [int(r) for r in args.rows.split(",")]
