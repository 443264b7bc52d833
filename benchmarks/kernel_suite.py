"""Per-kernel benchmark of the Triton kernels on a CUDA GPU against its ceilings (copy rate and bf16 matmul
rate, measured at start by benchmarks/ceilings.py, or --ceilings table for a known GPU's figures).

    python benchmarks/kernel_suite.py                 # full run, table on stdout, JSON to --out
    python benchmarks/kernel_suite.py --no-sweep      # skip the tile-config sweep
    python benchmarks/kernel_suite.py --only gemv,elementwise   # just those sections (decode,prefill,elementwise,gemv,sweep)
    TRITON_INTERPRET=1 python benchmarks/kernel_suite.py --smoke   # CPU: tiny shapes, checks the script runs

Reports:
- decode attention (Llama-3.1-8B: 32 q / 8 kv heads, head_dim 128, page 16, bf16) at batch
  1/16/64/256 x context 512..8192, unsplit vs split-KV (the heuristic's split count and the best of
  a sweep), as achieved bandwidth = K+V bytes of every context / time, against the copy rate;
- the split-KV crossover: per batch, the shortest context at which splitting wins by > 5%, and
  whether `use_split_kv` agrees; plus the same for two more shapes (Llama-3.2-1B: head_dim 64;
  Qwen2.5-7B: 28 q / 4 kv heads);
- prefill attention: one 8192-token prompt, 512-token chunks over 0/2048/7680-token prefixes and a
  batch of 16 fresh 512-token prompts, as TFLOP/s against the bf16 matmul rate. FLOPs are counted
  causally: query at position p costs 4 * head_dim * (p + 1) per head (QK^T and PV), nothing for
  masked-out keys;
- rms_norm(+residual), silu_and_mul, rotary and write_kv bandwidth (bytes each kernel must move)
  next to the torch reference's time, and the fused rotary + KV write against rotary then write_kv;
- gemv: the Triton GEMV/skinny GEMM against F.linear (cuBLAS) on the 8B decode projections at
  M = 1/2/4/8 and the per-step linear-layer total (benchmarks/gemv_section.py);
- a tile sweep (decode BLOCK_N x num_stages, prefill BLOCK_M x BLOCK_N x warps x stages).

Each section is its own module: benchmarks/decode_section.py (with the crossover), prefill_section.py,
elementwise_section.py, gemv_section.py and sweep_section.py; kernel_bench.py holds what they share.

Timing: triton.testing.do_bench, median, L2 flushed before each run (so KV comes from HBM).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import decode_section  # noqa: E402
import elementwise_section  # noqa: E402
import gemv_section  # noqa: E402
import prefill_section  # noqa: E402
import sweep_section  # noqa: E402
from ceilings import add_ceilings_arg, device_ceilings  # noqa: E402
from kernel_bench import LLAMA_1B, LLAMA_8B, QWEN_7B, SMOKE, Shape, Timer  # noqa: E402

from agentserve.kernels import paged_attention as pa  # noqa: E402
from agentserve.kernels._triton_utils import HAS_TRITON, num_sms  # noqa: E402

SECTION_NAMES = "decode,prefill,elementwise,gemv,sweep"


@dataclass
class RunPlan:
    """The shapes and sizes a run measures: `shape` in every section, `side_shapes` only in the
    decode crossover and the first prefill case."""
    shape: Shape
    side_shapes: list[Shape]
    batches: list[int]
    contexts: list[int]
    split_counts: list[int]
    tokens_list: list[int]
    hidden: int
    inter: int


FULL_PLAN = RunPlan(LLAMA_8B, [LLAMA_1B, QWEN_7B], batches=[1, 16, 64, 256], contexts=[512, 1024, 2048, 4096, 8192],
                    split_counts=[2, 4, 8, 16, 32], tokens_list=[1, 64, 4096], hidden=4096, inter=14336)
# Tiny shapes that Triton's interpreter runs on CPU in a few minutes: they check the script, not the kernels.
SMOKE_PLAN = RunPlan(SMOKE, [], batches=[1, 3], contexts=[40, 100], split_counts=[2, 4], tokens_list=[3],
                     hidden=64, inter=48)


@dataclass
class BenchRun:
    """What every section runs with."""
    timer: Timer
    device: str
    sms: int
    smoke: bool
    plan: RunPlan
    peak_tbs: float
    peak_tflops: float


def run_decode(run: BenchRun, report: dict[str, Any]) -> None:
    print("== decode attention (achieved KV bandwidth)")
    plan = run.plan
    rows = decode_section.bench_decode(run.timer, plan.shape, plan.batches, plan.contexts, plan.split_counts,
                                       run.sms, run.device, run.peak_tbs)
    for shape in plan.side_shapes:  # crossover check on other head layouts, fewer points
        rows += decode_section.bench_decode(run.timer, shape, [1, 16, 64], [1024, 4096], plan.split_counts,
                                            run.sms, run.device, run.peak_tbs)
    report["decode"] = rows
    report["split_crossover"] = decode_section.split_crossover(rows)


def run_prefill(run: BenchRun, report: dict[str, Any]) -> None:
    print("== prefill attention (causal TFLOP/s)")
    cases = prefill_section.prefill_cases(run.smoke)
    rows = prefill_section.bench_prefill(run.timer, run.plan.shape, cases, run.device, run.peak_tflops)
    for shape in run.plan.side_shapes:
        rows += prefill_section.bench_prefill(run.timer, shape, cases[:1], run.device, run.peak_tflops)
    report["prefill"] = rows


def run_elementwise(run: BenchRun, report: dict[str, Any]) -> None:
    print("== elementwise kernels (bytes moved / time)")
    plan = run.plan
    report["elementwise"] = elementwise_section.bench_elementwise(
        run.timer, plan.shape, plan.tokens_list, plan.hidden, plan.inter, run.device, run.peak_tbs)


def run_gemv(run: BenchRun, report: dict[str, Any]) -> None:
    print("== gemv: Triton vs F.linear (cuBLAS) on the decode projections")
    report["gemv"] = gemv_section.bench_gemv(run.timer.ms, run.device, run.peak_tbs, smoke=run.smoke)


def run_sweep(run: BenchRun, report: dict[str, Any]) -> None:
    print("== tile sweep")
    report["sweep"] = sweep_section.bench_sweep(run.timer, run.plan.shape, run.device, run.smoke)


# In run order (whatever order --only names them in).
SECTIONS: dict[str, Callable[[BenchRun, dict[str, Any]], None]] = {
    "decode": run_decode, "prefill": run_prefill, "elementwise": run_elementwise, "gemv": run_gemv,
    "sweep": run_sweep,
}


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_out = os.path.join(os.environ["OUT"], "kernels.json") if os.environ.get("OUT") else "kernels.json"
    parser.add_argument("--out", default=default_out, help="JSON results path (default: $OUT/kernels.json)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the tile-config sweep")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU with TRITON_INTERPRET=1 works)")
    parser.add_argument("--only", default=SECTION_NAMES,
                        help=f"comma-separated sections to run ({SECTION_NAMES})")
    parser.add_argument("--peak-bw", type=float, default=None, help="HBM ceiling, TB/s (default: --ceilings)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="bf16 dense ceiling, TFLOP/s (default: --ceilings)")
    add_ceilings_arg(parser)
    return parser.parse_args(argv)


def report_header(run: BenchRun) -> dict[str, Any]:
    import triton

    return {
        "device": torch.cuda.get_device_name() if run.device == "cuda" else "cpu (smoke)",
        "num_sms": run.sms, "torch": torch.__version__, "triton": triton.__version__,
        "ceilings": {"hbm_tbs": run.peak_tbs, "bf16_tflops": run.peak_tflops},
        "heuristic": {"SPLIT_TARGET_WAVES": pa.SPLIT_TARGET_WAVES, "SPLIT_MIN_KEYS": pa.SPLIT_MIN_KEYS,
                      "SPLIT_MAX": pa.SPLIT_MAX},
        "timing": "triton.testing.do_bench median, L2 flushed per run",
        # Present even when their sections do not run: the summary prints them.
        "elementwise": [],
        "split_crossover": {},
    }


def print_summary(report: dict[str, Any], run: BenchRun) -> None:
    print("\n== summary")
    print(f"{'kernel':58s} {'figure':>14s} {'ceiling':>12s} {'ratio':>7s}")
    decode_section.print_summary(report.get("decode", []), run.peak_tbs)
    prefill_section.print_summary(report.get("prefill", []), run.peak_tflops)
    elementwise_section.print_summary(report["elementwise"], run.peak_tbs)
    if "gemv" in report:
        gemv_section.print_summary(report["gemv"], run.peak_tbs)
    decode_section.print_crossover(report["split_crossover"])
    if "sweep" in report:
        sweep_section.print_best(report["sweep"])


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if not HAS_TRITON:
        print("triton is not importable", file=sys.stderr)
        return 2
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        print("no CUDA device: run with --smoke under TRITON_INTERPRET=1 to check the script", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    ceilings = device_ceilings(torch.device(device), torch.bfloat16, smoke=args.smoke, source=args.ceilings)
    peak_tbs = args.peak_bw if args.peak_bw is not None else ceilings.copy_bytes_s / 1e12
    peak_tflops = args.peak_tflops if args.peak_tflops is not None else ceilings.matmul_flop_s / 1e12
    run = BenchRun(Timer(device), device, num_sms(torch.device(device)) if device == "cuda" else 132, args.smoke,
                   SMOKE_PLAN if args.smoke else FULL_PLAN, peak_tbs, peak_tflops)
    report = report_header(run)
    overridden = args.peak_bw is not None or args.peak_tflops is not None
    report["ceilings"]["source"] = (f"--peak-bw / --peak-tflops where given, else {ceilings.source}" if overridden
                                    else ceilings.source)
    print(f"ceilings: {peak_tbs:.3g} TB/s, {peak_tflops:.3g} TFLOP/s ({report['ceilings']['source']})")
    print(f"== {report['device']}  ({run.sms} SMs)  torch {torch.__version__}  triton {report['triton']}")
    sections = set(args.only.split(","))
    for name, section in SECTIONS.items():
        if name in sections and not (name == "sweep" and args.no_sweep):
            section(run, report)
    print_summary(report, run)

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1, default=str)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
