"""A batch-1 decode layer's four GEMVs as one dependent chain (qkv → o → gate_up + SiLU → down, each reading
the previous one's output), over `--layers` layers of distinct Llama-3.1-8B-shaped weights in one CUDA graph,
against the same kernels timed alone (graph_timer: many calls of one kernel over weight copies).

What it answers: how much of the kernels' boundaries (launch ramp, last wave's tail) programmatic
dependent launch already hides inside a chain, and how far the chain stands from reading its weights at
the copy rate: the most that any cross-kernel scheme (a persistent kernel spanning a layer's stages)
could gain on the one-stream step. bf16 and FP8 weights, PDL on and off.

  python benchmarks/gemv_chain.py [--layers 32] [--out x.json]

Prints one line per (weights, PDL): us per layer in the chain, the four kernels alone, and the weights'
bytes at the copy rate; writes JSON."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import device_name, write_json  # noqa: E402
from graph_timer import graph_replay_us, time_us  # noqa: E402

HIDDEN, INTER, QKV = 4096, 14336, 6144
COPY_BYTES_S = 4.26e12  # shared/gpu/README.md, the H200's measured device copy rate
SHAPES = (("qkv", QKV, HIDDEN), ("o", HIDDEN, HIDDEN), ("gate_up", 2 * INTER, HIDDEN), ("down", HIDDEN, INTER))


def _layers(n: int, fp8: bool) -> list[dict[str, Any]]:
    from agentserve.kernels import fp8_linear

    out = []
    for _ in range(n):
        layer = {}
        for name, rows, cols in SHAPES:
            w = (torch.randn(rows, cols, device="cuda") / cols ** 0.5).to(torch.bfloat16)
            layer[name] = fp8_linear.quantize_weight_per_channel(w) if fp8 else (w, None)
        out.append(layer)
    return out


def _ops(fp8: bool) -> tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]:
    """(gemv(x, w, scale), gate_up_silu(x, w, scale)) with the engine's tiles."""
    from agentserve.kernels import fp8_linear, gemv, gemv_silu
    from agentserve.kernels._triton_utils import num_sms

    sms = num_sms(torch.device("cuda"))
    if fp8:
        def linear(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            return fp8_linear.fp8_gemv_triton(x, w, s)

        def silu(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            cfg = fp8_linear.fp8_gemv_config(w.shape[0], w.shape[1], sms, 1, kernel="gemv_silu",
                                             device_name=device_name())
            return gemv_silu.gemv_silu_mul_triton(x, w, cfg, s)
    else:
        def linear(x: torch.Tensor, w: torch.Tensor, s: Optional[torch.Tensor]) -> torch.Tensor:
            return gemv.gemv_triton(x, w)

        def silu(x: torch.Tensor, w: torch.Tensor, s: Optional[torch.Tensor]) -> torch.Tensor:
            return gemv_silu.gemv_silu_mul_triton(x, w, gemv.gemv_config(1, w.shape[0], w.shape[1], sms))
    return linear, silu


def measure(num_layers: int, fp8: bool, pdl: bool) -> dict[str, float]:
    from agentserve.kernels._triton_utils import set_pdl

    set_pdl(pdl)
    layers = _layers(num_layers, fp8)
    linear, silu = _ops(fp8)

    def chain(x: torch.Tensor) -> torch.Tensor:
        for layer in layers:
            q = linear(x, *layer["qkv"])[:, :HIDDEN]
            a = linear(q, *layer["o"])
            h = silu(a, *layer["gate_up"])
            x = linear(h, *layer["down"])
        return x

    x0 = torch.randn(1, HIDDEN, device="cuda", dtype=torch.bfloat16)
    chain_us = graph_replay_us(lambda: chain(x0)) / num_layers
    alone = {}
    for name, rows, cols in SHAPES:
        fn = silu if name == "gate_up" else linear
        x = torch.randn(1, cols, device="cuda", dtype=torch.bfloat16)
        alone[name] = time_us(fn, [(x, *layer[name]) for layer in layers])
    nbytes = sum(rows * cols for _, rows, cols in SHAPES) * (1 if fp8 else 2)
    return {"chain_us_per_layer": chain_us, "alone_us": alone, "alone_sum_us": sum(alone.values()),
            "bytes_us_per_layer": nbytes / COPY_BYTES_S * 1e6}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--weights", default="bf16,fp8", help="comma-separated: bf16, fp8")
    ap.add_argument("--pdl", default="on,off", help="comma-separated: on, off")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs CUDA")
        return 0
    result: dict[str, Any] = {"benchmark": "gemv_chain", "device": device_name(), "layers": args.layers, "runs": {}}
    for fp8 in [w == "fp8" for w in args.weights.split(",")]:
        for pdl in [p == "on" for p in args.pdl.split(",")]:
            key = f"{'fp8' if fp8 else 'bf16'} pdl {'on' if pdl else 'off'}"
            r = measure(args.layers, fp8, pdl)
            result["runs"][key] = r
            torch.cuda.empty_cache()  # the run's weights (~14 GB bf16) are garbage once measure returns
            print(f"  {key}: chain {r['chain_us_per_layer']:.1f} us per layer, alone {r['alone_sum_us']:.1f} "
                  f"({' '.join(f'{k} {v:.1f}' for k, v in r['alone_us'].items())}), weights at the copy rate "
                  f"{r['bytes_us_per_layer']:.1f}", flush=True)
    write_json(result, args.out, "gemv_chain")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
