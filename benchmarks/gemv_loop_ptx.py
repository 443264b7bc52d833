"""What the GEMVs' K loop compiles to for an H100/H200 (sm_90), on this CPU machine: per kernel and tile, the
loop body's PTX instructions per weight element, its global loads, and its barriers and shared-memory stores
(a layout conversion inside the loop). No GPU needed: Triton compiles to PTX here, with the pointer and
stride divisibility the runtime would specialise (so the loads vectorise as they do on the device).

Why (eighteenth session, benchmarks/NOTES.md): the FP8 GEMVs read ~3.5 TB/s where the bf16 ones read ~4.2.
Their K loop moves each x chunk through shared memory between barriers: x's 16-byte loads hold 8 bf16
while a thread's 16-byte weight load holds 16 fp8, so x is converted to the weights' layout every
iteration; with one warp per program the conversion stays inside the warp. (A K loop over groups of 8 weights
without the conversion was built and measured slower on the H200: NOTES.md, nineteenth session.)

  python benchmarks/gemv_loop_ptx.py [--out x.json]   # the shipped 8B tiles, bf16 and FP8, and one-warp FP8 tiles
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_json  # noqa: E402

TESTS = str(Path(__file__).resolve().parent.parent / "tests")  # the compile and loop helpers: tests/helpers/sm90_ptx.py

SCRIPT = r'''
import json
from agentserve.kernels import fp8_linear, gemv, gemv_silu
from helpers.sm90_ptx import FP8_GEMV as FP8, FP8_SILU as SILU, GEMV, compile_ptx, k_loop


def report(name, kernel, signature, constexprs, warps, elems):
    body = k_loop(compile_ptx(kernel, signature, constexprs, warps))
    text = "\n".join(body)
    print(json.dumps({"case": name, "instr_per_weight": round(len(body) / elems, 2),
                      "global_loads": text.count("ld.global"), "barriers": text.count("bar.sync"),
                      "shared_stores": text.count("stmatrix") + text.count("st.shared")}))


fixed = {"EVEN_K": True, "USE_PDL": True}
for n, k in ((6144, 4096), (4096, 4096), (4096, 14336)):
    c = gemv.gemv_config(1, n, k, 132)
    report(f"bf16 gemv {n}x{k} {c.block_n}x{c.block_k}/{c.num_warps}w", gemv._gemv_fma_kernel, GEMV,
           {**fixed, "HAS_BIAS": False, "BLOCK_N": c.block_n, "BLOCK_K": c.block_k}, c.num_warps,
           c.block_n * c.block_k / (32 * c.num_warps))
    c = fp8_linear.fp8_gemv_config(n, k, 132, 1, device_name="NVIDIA H200")
    report(f"fp8 gemv {n}x{k} {c.block_n}x{c.block_k}/{c.num_warps}w", fp8_linear._fp8_gemv_kernel, FP8,
           {**fixed, "HAS_BIAS": False, "BLOCK_N": c.block_n, "BLOCK_K": c.block_k, "W_FIRST": True},
           c.num_warps, c.block_n * c.block_k / (32 * c.num_warps))
c = fp8_linear.fp8_gemv_config(28672, 4096, 132, 1, kernel="gemv_silu", device_name="NVIDIA H200")
report(f"fp8 gemv_silu 28672x4096 {c.block_n}x{c.block_k}/{c.num_warps}w", gemv_silu._gemv_silu_mul_kernel, SILU,
       {**fixed, "HAS_SCALE": True, "HAS_BIAS": False, "BLOCK_I": c.block_n // 2, "BLOCK_K": c.block_k,
        "W_FIRST": True}, c.num_warps, c.block_n * c.block_k / (32 * c.num_warps))
for rows, block_k in ((2, 1024), (4, 512), (4, 1024), (8, 512)):
    report(f"fp8 gemv one-warp {rows}x{block_k}/1w", fp8_linear._fp8_gemv_kernel, FP8,
           {**fixed, "HAS_BIAS": False, "BLOCK_N": rows, "BLOCK_K": block_k, "W_FIRST": True}, 1,
           rows * block_k / 32)
'''


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the interpreter compiles nothing
    env["PYTHONPATH"] = os.pathsep.join([TESTS, *filter(None, [env.get("PYTHONPATH")])])  # tests/helpers
    run = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    if run.returncode != 0:
        print(run.stderr[-3000:])
        return 1
    rows: list[dict[str, Any]] = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    print("| kernel, shape, tile | PTX instr per weight element | global loads | barriers | shared stores |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['instr_per_weight']} | {r['global_loads']} | {r['barriers']} | {r['shared_stores']} |")
    write_json({"benchmark": "gemv_loop_ptx", "target": "sm_90", "rows": rows}, args.out, "gemv_loop_ptx")
    return 0 if rows else 1


if __name__ == "__main__":
    raise SystemExit(main())
