"""The FP8 GEMV on the tensor cores ("dot": e4m3 tiles widened to bf16 in registers, tl.dot over M padded
to 16; kernels/fp8_linear.py) against the fma kernel's tiles (fp8_gemv_config: the shipped table or the
heuristic), per projection of the Llama-3.1-8B target and the Llama-3.2-1B draft: device us per call
from a CUDA graph over weight copies larger than the L2, with a sweep of the dot kernel's tiles.

  python benchmarks/fp8_gemv_dot.py [--rows 1,2] [--out x.json]

gate_up is timed as the engine runs it: the fma kernel with SiLU-and-multiply in its epilogue
(kernels/gemv_silu.py) against the dot GEMV followed by silu_and_mul. Prints one line per (shape, M),
then per model and M the layer's sum (qkv + o + gate_up + down) for the fma tiles and for the one dot
tile with the lowest 8B sum at M = 1, `BEST_FP8_DOT_TILE=BLOCK_N,BLOCK_K,warps,stages`; writes JSON."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import device_name, write_json  # noqa: E402
from graph_timer import GEMV_WORKING_SET, parse_gpu_args, time_us  # noqa: E402

# (BLOCK_N, BLOCK_K, warps, stages)
DOT_TILES = [(32, 256, 4, 4), (64, 128, 4, 4), (64, 256, 4, 3), (64, 256, 4, 4), (128, 128, 4, 4),
             (128, 128, 8, 3), (128, 256, 8, 3), (64, 512, 4, 3), (32, 512, 4, 3), (256, 128, 8, 3)]
MODELS = {"1b": (2048, 8192, 3072), "8b": (4096, 14336, 6144)}  # (hidden, intermediate, qkv rows)
VOCAB = 128256
LAYER = ("qkv", "o", "gate_up", "down")


def _label(tile: tuple[int, int, int, int]) -> str:
    return ",".join(str(v) for v in tile)


def measure(rows: list[int]) -> list[dict[str, Any]]:
    from agentserve.kernels import activation, fp8_linear, gemv, gemv_silu
    from agentserve.kernels._triton_utils import num_sms

    sms = num_sms(torch.device("cuda"))
    device = device_name()
    out = []
    for model, (hidden, inter, qkv) in MODELS.items():
        for proj, n, k in (("qkv", qkv, hidden), ("o", hidden, hidden), ("gate_up", 2 * inter, hidden),
                           ("down", hidden, inter), ("lm_head", VOCAB, hidden)):
            copies = max(2, -(-GEMV_WORKING_SET // (n * k)))
            quantized = [fp8_linear.quantize_weight_per_channel(
                torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5) for _ in range(copies)]
            fma_fn: Callable[..., torch.Tensor]
            dot_fn: Callable[..., torch.Tensor]
            if proj == "gate_up":
                def fma_fn(x: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor, config: Any) -> torch.Tensor:
                    return gemv_silu.gemv_silu_mul_triton(x, wq, config, ws)

                def dot_fn(x: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor, config: Any) -> torch.Tensor:
                    return activation.silu_and_mul_triton(fp8_linear.fp8_gemv_triton(x, wq, ws, config=config))
            else:
                def fma_fn(x: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor, config: Any) -> torch.Tensor:
                    return fp8_linear.fp8_gemv_triton(x, wq, ws, config=config)
                dot_fn = fma_fn
            for m in rows:
                sets = [(torch.randn(m, k, device="cuda", dtype=torch.bfloat16), wq, ws) for wq, ws in quantized]
                kernel = "gemv_silu" if proj == "gate_up" else "gemv"
                fma_cfg = fp8_linear.fp8_gemv_config(n, k, sms, m, kernel=kernel, device_name=device)
                fma_us = time_us(fma_fn, sets, config=fma_cfg)
                sweep = {}
                for tile in DOT_TILES:
                    if k % tile[1] == 0:
                        cfg = gemv.GemvConfig("dot", tile[0], tile[1], num_warps=tile[2], num_stages=tile[3])
                        sweep[_label(tile)] = time_us(dot_fn, sets, config=cfg)
                best = min(sweep, key=sweep.__getitem__)
                out.append({"model": model, "proj": proj, "n": n, "k": k, "m": m, "fma_us": fma_us,
                            "dot_us": sweep, "best": best, "best_us": sweep[best]})
                print(f"  {model} {proj} {n}x{k} M={m}: fma {fma_us:.1f} us ({n * k / fma_us / 1e6:.2f} TB/s), "
                      f"best dot {best} {sweep[best]:.1f} us | " + " ".join(f"{t} {v:.1f}" for t, v in sweep.items()),
                      flush=True)
            del quantized
    return out


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,2")
    parsed = parse_gpu_args(ap, argv)
    if parsed is None:
        return 0
    args, rows = parsed
    result: dict[str, Any] = {"benchmark": "fp8_gemv_dot", "device": device_name(), "rows": measure(rows)}

    def layer(model: str, m: int) -> list[dict[str, Any]]:
        return [r for r in result["rows"] if r["model"] == model and r["m"] == m and r["proj"] in LAYER]

    eight = layer("8b", rows[0])
    common = set.intersection(*(set(r["dot_us"]) for r in eight))
    best_tile = min(common, key=lambda t: sum(r["dot_us"][t] for r in eight))
    result["best_dot_tile"] = best_tile
    for model in MODELS:
        for m in rows:
            per = layer(model, m)
            fma = sum(r["fma_us"] for r in per)
            one = sum(r["dot_us"].get(best_tile, r["best_us"]) for r in per)
            print(f"{model} M={m} per layer: fma tiles {fma:.1f} us, dot {best_tile} {one:.1f} us, "
                  f"best dot per shape {sum(r['best_us'] for r in per):.1f} us")
    print(f"BEST_FP8_DOT_TILE={best_tile}")
    write_json(result, args.out, "fp8_gemv_dot")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
