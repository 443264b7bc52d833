"""The weight-stationary few-rows GEMV (kernels/gemv_rows.py) against cuBLAS and the one-row GEMV, per
Llama-3.1-8B projection, at the M of a batch-1 speculative verification (k + 1 rows): device us per
call from a CUDA graph over weight copies larger than the L2, with a sweep of its tiles.

  python benchmarks/gemv_rows.py                       # M = 2, 3, 5, 8 on the GPU
  python benchmarks/gemv_rows.py --rows 5 --out x.json

Prints one line per (M, shape): cuBLAS, the one-row GEMV at M = 1 (the decode step's reference),
the rows kernel with its default tiles and the best of the sweep, in us and TB/s; writes JSON."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import device_name, write_json  # noqa: E402
from graph_timer import GEMV_WORKING_SET, time_us  # noqa: E402

# (K, N) of Llama-3.1-8B's qkv, o, gate_up, down and lm_head.
SHAPES = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096), (4096, 128256)]
# (BLOCK_N, BLOCK_K, num_warps)
SWEEP = [(4, 256, 4), (4, 512, 8), (2, 512, 4), (2, 1024, 8), (8, 256, 8), (8, 128, 4), (1, 1024, 4), (1, 2048, 8)]


def measure(rows: list[int]) -> list[dict[str, Any]]:
    from agentserve.kernels import gemv, gemv_rows

    out = []
    for k, n in SHAPES:
        copies = max(2, -(-GEMV_WORKING_SET // (2 * n * k)))
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5 for _ in range(copies)]
        one = time_us(gemv.gemv_triton, [(torch.randn(1, k, device="cuda", dtype=torch.bfloat16), w) for w in weights])
        for m in rows:
            sets = [(torch.randn(m, k, device="cuda", dtype=torch.bfloat16), w) for w in weights]
            cublas = time_us(F.linear, sets)
            default = time_us(gemv_rows.gemv_rows_triton, sets)
            sweep = {}
            for block_n, block_k, warps in SWEEP:
                if k % block_k == 0 and max(2, 1 << (m - 1).bit_length()) * block_n * block_k <= 16384:
                    sweep[f"{block_n}x{block_k}/{warps}w"] = time_us(gemv_rows.gemv_rows_triton, sets,
                                                                     config=(block_n, block_k, warps))
            best = min(sweep, key=sweep.__getitem__)
            tb = 2 * n * k / 1e6
            row = {"m": m, "k": k, "n": n, "cublas_us": cublas, "gemv_m1_us": one, "rows_us": default,
                   "rows_config": list(gemv_rows.rows_config(m, n, k)), "sweep_us": sweep, "best": best,
                   "best_us": sweep[best]}
            out.append(row)
            print(f"  M={m} {k}x{n}: cuBLAS {cublas:.1f} us ({tb / cublas:.2f} TB/s), one-row GEMV at M=1 {one:.1f}, "
                  f"rows {default:.1f} ({tb / default:.2f} TB/s), best {best} {sweep[best]:.1f} us", flush=True)
        del weights
    return out


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="2,3,5,8")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs CUDA")
        return 0
    rows = [int(r) for r in args.rows.split(",")]
    result = {"benchmark": "gemv_rows", "device": device_name(), "rows": measure(rows)}
    for m in rows:
        per = [r for r in result["rows"] if r["m"] == m]
        print(f"M={m} per 8B layer (qkv+o+gate_up+down): cuBLAS {sum(r['cublas_us'] for r in per[:4]):.1f} us, "
              f"rows {sum(r['rows_us'] for r in per[:4]):.1f}, rows best {sum(r['best_us'] for r in per[:4]):.1f}, "
              f"one-row GEMV at M=1 {sum(r['gemv_m1_us'] for r in per[:4]):.1f}")
    write_json(result, args.out, "gemv_rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
