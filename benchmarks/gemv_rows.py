"""The GEMV's "dot" kernel (kernels/gemv.py: tl.dot over M padded to 16, weight tiles streamed through
the software pipeline) against cuBLAS and the one-row GEMV, per Llama-3.1-8B projection, at the M of a
batch-1 speculative verification (k + 1 rows): device us per call from a CUDA graph over weight copies
larger than the L2, with a sweep of its tiles. (A weight-stationary fp32-FMA kernel for these rows
measured 2.4-3x slower than cuBLAS here, compute-bound: benchmarks/RESULTS.md.)

  python benchmarks/gemv_rows.py                       # M = 3, 5, 8 on the GPU
  python benchmarks/gemv_rows.py --rows 5 --out x.json

cuBLASLt (torch.backends.cuda.preferred_blas_library) is timed beside torch's default cuBLAS.

Prints one line per (M, shape): cuBLAS, the one-row GEMV at M = 1 (the decode step's reference), the
dot kernel with its default tiles and the best of the sweep, in us and TB/s; then, per M, the one tile
with the lowest sum over a layer's four projections as `BEST_DOT_TILE=BLOCK_N,BLOCK_K,warps,stages`
(the H200 sweep of 2026-12-03 found none faster than cuBLAS at M = 5: RESULTS.md); writes JSON."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import device_name, write_json  # noqa: E402
from graph_timer import GEMV_WORKING_SET, parse_gpu_args, time_us  # noqa: E402

# (K, N) of Llama-3.1-8B's qkv, o, gate_up, down and lm_head.
SHAPES = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096), (4096, 128256)]
# (BLOCK_N, BLOCK_K, num_warps, num_stages)
SWEEP = [(16, 256, 4, 4), (16, 512, 4, 3), (16, 128, 4, 8), (32, 128, 4, 4), (32, 256, 4, 4), (32, 256, 4, 6),
         (32, 128, 4, 8), (64, 128, 4, 4), (64, 128, 4, 6), (64, 256, 8, 3), (16, 256, 4, 6), (32, 512, 8, 3)]


def measure(rows: list[int]) -> list[dict[str, Any]]:
    from agentserve.kernels import gemv

    out = []
    for k, n in SHAPES:
        copies = max(2, -(-GEMV_WORKING_SET // (2 * n * k)))
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5 for _ in range(copies)]
        one_sets = [(torch.randn(1, k, device="cuda", dtype=torch.bfloat16), w) for w in weights]
        one = time_us(gemv.gemv_triton, one_sets)
        for m in rows:
            sets = [(torch.randn(m, k, device="cuda", dtype=torch.bfloat16), w) for w in weights]
            cublas = time_us(F.linear, sets)
            cublaslt = time_us(_linear_cublaslt, sets)
            default = time_us(gemv.gemv_triton, sets)  # gemv_config's tiles ("dot" for M >= 3)
            sweep = {}
            for block_n, block_k, warps, stages in SWEEP:
                if k % block_k == 0:
                    cfg = gemv.GemvConfig("dot", block_n, block_k, num_warps=warps, num_stages=stages)
                    sweep[f"{block_n},{block_k},{warps},{stages}"] = time_us(gemv.gemv_triton, sets, config=cfg)
            best = min(sweep, key=sweep.__getitem__)
            tb = 2 * n * k / 1e6
            out.append({"m": m, "k": k, "n": n, "cublas_us": cublas, "cublaslt_us": cublaslt, "gemv_m1_us": one,
                        "dot_us": default, "sweep_us": sweep, "best": best, "best_us": sweep[best]})
            print(f"  M={m} {k}x{n}: cuBLAS {cublas:.1f} us ({tb / cublas:.2f} TB/s), cuBLASLt {cublaslt:.1f}, one-row GEMV at M=1 {one:.1f}, "
                  f"dot {default:.1f} ({tb / default:.2f} TB/s), best {best} {sweep[best]:.1f} us "
                  f"({tb / sweep[best]:.2f} TB/s)", flush=True)
        del weights
    return out


def _linear_cublaslt(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """F.linear through cuBLASLt's heuristics (torch's default bf16 GEMM goes to cuBLAS): whether it
    picks better tiles for a verification's few rows."""
    before = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library("cublaslt")
    try:
        return F.linear(x, w)
    finally:
        torch.backends.cuda.preferred_blas_library(before)


def best_uniform_tile(rows: list[dict[str, Any]], m: int) -> tuple[str, float]:
    """The swept tile with the lowest sum over one layer's four projections (qkv, o, gate_up, down) at M."""
    layer = [r for r in rows if r["m"] == m and r["n"] != 128256]
    totals = {tile: sum(r["sweep_us"].get(tile, float("inf")) for r in layer) for tile in layer[0]["sweep_us"]}
    best = min(totals, key=totals.__getitem__)
    return best, totals[best]


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="3,5,8")
    parsed = parse_gpu_args(ap, argv)
    if parsed is None:
        return 0
    args, rows = parsed
    result: dict[str, Any] = {"benchmark": "gemv_rows", "device": device_name(), "rows": measure(rows), "best": {}}
    for m in rows:
        per = [r for r in result["rows"] if r["m"] == m and r["n"] != 128256]
        tile, total = best_uniform_tile(result["rows"], m)
        result["best"][m] = {"tile": tile, "layer_us": total}
        print(f"M={m} per 8B layer (qkv+o+gate_up+down): cuBLAS {sum(r['cublas_us'] for r in per):.1f} us, "
              f"cuBLASLt {sum(r['cublaslt_us'] for r in per):.1f}, "
              f"dot {sum(r['dot_us'] for r in per):.1f}, best per shape {sum(r['best_us'] for r in per):.1f}, "
              f"best one tile {total:.1f} ({tile}), one-row GEMV at M=1 {sum(r['gemv_m1_us'] for r in per):.1f}")
        print(f"BEST_DOT_TILE={tile}")
    write_json(result, args.out, "gemv_rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
