"""The FP8 GEMVs of a draft model's forward at M = 1 (its decode step) and M = 2 (the 2-token catch-up
after every verification: spec/continuation.py), with a sweep of the fma tiles at each M.

Why: on the H200 the FP8 Llama-3.2-1B draft's catch-up took 0.86 ms against 0.69 ms for its decode step,
and the kernel diff (spec_profile.py --events --draft-kernels, 2026-12-04) put +139 us of the +173 us in
the fused gate_up + SiLU GEMV (13.4 -> 22.1 us per layer) and +47 us in the other FP8 GEMVs: the M = 1
tiles run M programs per weight block, so at M = 2 the grid doubles. This measures each tile at both M
(device us per call from a CUDA graph over weight copies larger than the L2) and prints, per shape and M,
the default tile and the best of the sweep.

  python benchmarks/fp8_gemv_rows.py [--models 1b,8b] [--rows 1,2] [--out x.json] [--write-tiles t.json]

`--write-tiles` writes each (kernel, N, K, M)'s best tile as the table kernels/fp8_gemv_tiles.py reads
(shipped as kernels/configs/fp8_gemv_<device>.json; AGENTSERVE_FP8_GEMV_TILES=t.json for an A/B run).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import device_name, write_json  # noqa: E402
from graph_timer import GEMV_WORKING_SET, parse_gpu_args, time_us  # noqa: E402

# (rows per program, BLOCK_K, warps): 8 KB tiles from 4 to 128 rows at 4 and 8 warps, and some 4 KB and
# 16 KB ones. (A prefetching K loop was swept too and lost at every shape: benchmarks/NOTES.md,
# seventeenth session.) Then one-warp tiles: with more than one warp, the fp8 kernels' K loop moves each x
# chunk through shared memory between barriers (x's 16-byte loads hold 8 bf16, the weights' 16 fp8: a
# layout conversion, seen in the sm_90 PTX; the bf16 GEMV's loop has none), and with one warp it does not
# (eighteenth session, benchmarks/NOTES.md).
TILES = [(4, 2048, 4), (4, 2048, 8), (8, 1024, 4), (8, 1024, 8), (16, 512, 4), (16, 512, 8), (32, 256, 4),
         (32, 256, 8), (64, 128, 4), (64, 128, 8), (128, 64, 4), (128, 64, 8), (8, 512, 4), (16, 256, 4),
         (16, 1024, 8), (32, 512, 8), (8, 2048, 8), (2, 1024, 1), (4, 512, 1), (4, 1024, 1), (8, 512, 1)]
# (hidden, intermediate, qkv rows) of the models the benchmarks run: the Llama-3.2-1B draft (32 + 2 x 8
# heads of 64) and the Llama-3.1-8B target (32 + 2 x 8 heads of 128).
MODELS = {"1b": (2048, 8192, 3072), "8b": (4096, 14336, 6144)}
VOCAB = 128256  # Llama 3's; an FP8 model's (or draft's) lm_head takes the FP8 GEMV at batch 1 (model/fp8_lm_head.py)


def _shapes(models: list[str]) -> list[tuple[str, int, int]]:
    """(name, N, K) of one layer's projections, per model."""
    out = []
    for name in models:
        hidden, inter, qkv = MODELS[name]
        out += [(f"{name} qkv", qkv, hidden), (f"{name} o", hidden, hidden), (f"{name} gate_up", 2 * inter, hidden),
                (f"{name} down", hidden, inter), (f"{name} lm_head", VOCAB, hidden)]
    return out


def measure(models: list[str], rows: list[int]) -> list[dict[str, Any]]:
    from agentserve.kernels import fp8_linear, gemv, gemv_silu
    from agentserve.kernels._triton_utils import num_sms

    out = []
    sms = num_sms(torch.device("cuda"))
    device = device_name()
    for name, n, k in _shapes(models):
        copies = max(2, -(-GEMV_WORKING_SET // (n * k)))
        quantized = [fp8_linear.quantize_weight_per_channel(torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
                                                            / k ** 0.5) for _ in range(copies)]
        fn: Callable[..., torch.Tensor]
        kernel = "gemv_silu" if name.endswith("gate_up") else "gemv"
        if kernel == "gemv_silu":
            def fn(x: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor, config: gemv.GemvConfig) -> torch.Tensor:
                return gemv_silu.gemv_silu_mul_triton(x, wq, config, ws)
        else:
            def fn(x: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor, config: gemv.GemvConfig) -> torch.Tensor:
                return fp8_linear.fp8_gemv_triton(x, wq, ws, config=config)
        for m in rows:
            sets = [(torch.randn(m, k, device="cuda", dtype=torch.bfloat16), wq, ws) for wq, ws in quantized]
            default_cfg = fp8_linear.fp8_gemv_config(n, k, sms, m, kernel=kernel, device_name=device)
            default = time_us(fn, sets, config=default_cfg)
            tiles = [gemv.GemvConfig("fma", r, bk, num_warps=w, num_stages=1) for r, bk, w in TILES if k % bk == 0]
            sweep = {_label(cfg): time_us(fn, sets, config=cfg) for cfg in tiles}
            best = min(sweep, key=sweep.__getitem__)
            out.append({"shape": name, "kernel": kernel, "n": n, "k": k, "m": m, "default": _label(default_cfg),
                        "default_us": default, "sweep_us": sweep, "best": best, "best_us": sweep[best]})
            print(f"  {name} {n}x{k} M={m}: default {out[-1]['default']} {default:.1f} us, best {best} "
                  f"{sweep[best]:.1f} us | " + " ".join(f"{t} {v:.1f}" for t, v in sweep.items()), flush=True)
        del quantized
    return out


def _label(cfg: Any) -> str:
    """A tile's label: rows x BLOCK_K / warps."""
    return f"{cfg.block_n}x{cfg.block_k}/{cfg.num_warps}w"


def _tile_entry(row: dict[str, Any]) -> dict[str, Any]:
    """A table entry (kernels/fp8_gemv_tiles.py) for a measured row's best tile (its _label parsed)."""
    tile, warps = row["best"].rstrip("w").split("/")
    block_n, block_k = tile.split("x")
    return {"kernel": row["kernel"], "n": row["n"], "k": row["k"], "m": row["m"], "block_n": int(block_n),
            "block_k": int(block_k), "num_warps": int(warps), "us": round(row["best_us"], 2)}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="1b,8b", help=f"comma-separated: {', '.join(MODELS)}")
    ap.add_argument("--rows", default="1,2")
    ap.add_argument("--write-tiles", default=None, help="the best tiles as a kernels/fp8_gemv_tiles.py table")
    parsed = parse_gpu_args(ap, argv)
    if parsed is None:
        return 0
    args, rows = parsed
    models = args.models.split(",")
    result = {"benchmark": "fp8_gemv_rows", "device": device_name(), "rows": measure(models, rows)}
    for model in models:
        for m in rows:
            per = [r for r in result["rows"] if r["m"] == m and r["shape"].startswith(model + " ")
                   and not r["shape"].endswith("lm_head")]
            print(f"{model} M={m} per layer: default tiles {sum(r['default_us'] for r in per):.1f} us, best per shape "
                  f"{sum(r['best_us'] for r in per):.1f} us ({', '.join(r['shape'] + ' ' + r['best'] for r in per)})")
    write_json(result, args.out, "fp8_gemv_rows")
    if args.write_tiles:
        Path(args.write_tiles).write_text(json.dumps({"device": result["device"], "source": "benchmarks/fp8_gemv_rows.py",
                                                      "tiles": [_tile_entry(r) for r in result["rows"]]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
