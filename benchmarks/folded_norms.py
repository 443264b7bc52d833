"""The folded norms' kernels (model/folded_norms.py) against the kernels they replace, per Llama-3.1-8B
layer at batch 1: device us per call from a CUDA graph over weight copies larger than the L2.

  unfolded: residual add + RMSNorm (2 per layer), then the plain GEMVs (qkv, o, gate_up + SiLU, down)
  folded:   qkv and gate_up + SiLU with the norm's statistic, o and down with the residual add

  python benchmarks/folded_norms.py [--out x.json]

Prints one line per kernel and the per-layer sums; writes JSON. Timed alone, each kernel pays its
own launch and tail, which PDL partly hides inside a real step: the step's figure is latency.py's."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import device_name, write_json  # noqa: E402
from graph_timer import GEMV_WORKING_SET, time_us  # noqa: E402

HIDDEN, INTER, QKV = 4096, 14336, 6144
EPS = 1e-5


def measure() -> dict[str, float]:
    from agentserve.kernels import gemv, gemv_silu, rmsnorm
    from agentserve.kernels._triton_utils import num_sms

    dev = torch.device("cuda")
    bf16 = torch.bfloat16

    def weights(n: int, k: int) -> list[torch.Tensor]:
        copies = max(2, -(-GEMV_WORKING_SET // (2 * n * k)))
        return [(torch.randn(n, k, device=dev) / k ** 0.5).to(bf16) for _ in range(copies)]

    def vec(k: int) -> torch.Tensor:
        return torch.randn(1, k, device=dev, dtype=bf16)

    def silu(x: torch.Tensor, w: torch.Tensor, **kw: Any) -> torch.Tensor:
        return gemv_silu.gemv_silu_mul_triton(x, w, gemv.gemv_config(1, w.shape[0], w.shape[1], num_sms(dev)), **kw)

    out: dict[str, float] = {}
    gamma = torch.ones(HIDDEN, device=dev, dtype=bf16)
    out["add_rms_norm"] = time_us(lambda x, r: rmsnorm.rms_norm_triton(x, gamma, EPS, r), [(vec(HIDDEN), vec(HIDDEN))])
    shapes: list[tuple[str, int, int, Callable[..., torch.Tensor], str]] = [
        ("qkv", QKV, HIDDEN, gemv.gemv_triton, "norm"), ("o", HIDDEN, HIDDEN, gemv.gemv_triton, "residual"),
        ("gate_up_silu", 2 * INTER, HIDDEN, silu, "norm"), ("down", HIDDEN, INTER, gemv.gemv_triton, "residual")]
    for name, n, k, fn, fused in shapes:
        ws = weights(n, k)
        out[name] = time_us(fn, [(vec(k), w) for w in ws])
        if fused == "norm":
            out[name + "_norm"] = time_us(lambda x, w: fn(x, w, norm_eps=EPS), [(vec(k), w) for w in ws])
        else:
            out[name + "_residual"] = time_us(lambda x, w, r: fn(x, w, residual=r), [(vec(k), w, vec(n)) for w in ws])
        print(f"  {name} {n}x{k}: plain {out[name]:.1f} us, with the {fused} {out[name + '_' + fused]:.1f} us",
              flush=True)
        del ws
    return out


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs CUDA")
        return 0
    t = measure()
    unfolded = 2 * t["add_rms_norm"] + t["qkv"] + t["o"] + t["gate_up_silu"] + t["down"]
    folded = t["qkv_norm"] + t["o_residual"] + t["gate_up_silu_norm"] + t["down_residual"]
    print(f"add + RMSNorm {t['add_rms_norm']:.1f} us; per 8B layer: unfolded {unfolded:.1f} us, folded {folded:.1f} us")
    write_json({"benchmark": "folded_norms", "device": device_name(), "us": t, "layer_unfolded_us": unfolded,
                "layer_folded_us": folded}, args.out, "folded_norms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
