"""Multi-LoRA shrink + expand (kernels/lora.py) against the base projection they ride on, on the
Llama-3.1-8B shapes (bf16, max_loras 64): what one LoRA-enabled linear layer costs on top of its
F.linear, per step shape, and a small tile sweep to tune `lora_kernel_config`.

    python benchmarks/lora_kernels.py                # table on stdout, JSON to --out / $OUT
    python benchmarks/lora_kernels.py --no-sweep
    TRITON_INTERPRET=1 python benchmarks/lora_kernels.py --smoke   # CPU: tiny shapes, the script runs

Rows: decode (1 token on 1 adapter; 64 tokens over 1 / 8 / 64 adapters; 256 over 64), a mixed step
(a 512-token chunk + 63 decodes over 8 adapters) and a 4096-token prefill over 8 adapters, at
ranks 16 and 64; base-only steps (every token -1) show what a LoRA-enabled graph pays with no
adapter active. "per-step" sums qkv, o, gate_up and down x 32 layers at decode M=1, rank 16: the
kernel share of the single-stream target (>= 0.90x base) in issue 13.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

from agentserve.kernels import lora

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _results import write_json  # noqa: E402

# (name, in_features, output slices)
MODULES = [("qkv", 4096, [4096, 1024, 1024]), ("o", 4096, [4096]), ("gate_up", 4096, [14336, 14336]),
           ("down", 14336, [4096])]
SMOKE_MODULES = [("qkv", 64, [64, 16, 16]), ("down", 96, [64])]
# (name, tokens per request, adapters used; -1 rows are base-only)
STEPS = [("decode 1x1", [1], 1), ("decode 64 / 1 adapter", [1] * 64, 1), ("decode 64 / 8", [1] * 64, 8),
         ("decode 64 / 64", [1] * 64, 64), ("decode 256 / 64", [1] * 256, 64),
         ("mixed 512+63 / 8", [512] + [1] * 63, 8), ("prefill 4096 / 8", [512] * 8, 8),
         ("decode 64 base-only", [1] * 64, 0)]
SMOKE_STEPS = [("decode 4 / 2", [1] * 4, 2), ("mixed 20+3 / 2", [20, 1, 1, 1], 2), ("base-only", [1] * 3, 0)]


def bench(fn: Callable[[], Any], smoke: bool) -> float:
    """Median milliseconds (do_bench flushes L2 between runs on the GPU)."""
    if smoke:
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def make_step(lengths: list[int], num_adapters: int, max_loras: int, device: str) -> torch.Tensor:
    slots: list[int] = []
    for i, n in enumerate(lengths):
        slots += [i % num_adapters if num_adapters else -1] * n
    return torch.tensor(slots, dtype=torch.int32, device=device)


def weights(in_features: int, sizes: list[int], rank: int, max_loras: int, dtype: torch.dtype,
            device: str) -> dict[str, Any]:
    n = sum(sizes)
    return dict(lora_a=torch.randn(max_loras, len(sizes), rank, in_features, device=device).to(dtype) * 0.01,
                lora_b=torch.randn(max_loras, rank, n, device=device).to(dtype) * 0.01,
                ranks=torch.full((max_loras, len(sizes)), rank, dtype=torch.int32, device=device),
                scaling=torch.full((max_loras, len(sizes)), 2.0, device=device),
                base=torch.randn(n, in_features, device=device).to(dtype) * 0.01,
                starts=lora.slice_starts_for(sizes, torch.device(device)))


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = "cpu" if args.smoke else "cuda"
    dtype = torch.float16 if args.smoke else torch.bfloat16  # the interpreter's bf16 dot is upcast
    max_loras = 4 if args.smoke else 64
    modules, steps = (SMOKE_MODULES, SMOKE_STEPS) if args.smoke else (MODULES, STEPS)
    ranks = [8] if args.smoke else [16, 64]
    rows: list[dict[str, Any]] = []
    print(f"{'module':8} {'step':24} {'rank':>4} {'base ms':>9} {'lora ms':>9} {'meta ms':>8} {'lora/base':>9}")
    for rank in ranks:
        for mod_name, k, sizes in modules:
            w = weights(k, sizes, rank, max_loras, dtype, device)
            for step_name, lengths, adapters in steps:
                slots = make_step(lengths, adapters, max_loras, device)
                x = torch.randn(slots.shape[0], k, device=device).to(dtype)
                y = F.linear(x, w["base"])
                meta = lora.build_lora_batch_meta(slots, max_loras)
                base_ms = bench(lambda: F.linear(x, w["base"]), args.smoke)
                lora_ms = bench(lambda: lora.lora_expand(
                    y, lora.lora_shrink(x, w["lora_a"], w["ranks"], meta), w["lora_b"], w["ranks"],
                    w["scaling"], meta, w["starts"]), args.smoke)
                meta_ms = bench(lambda: lora.build_lora_batch_meta(slots, max_loras), args.smoke)
                cfg = lora.lora_kernel_config(meta, k, len(sizes))
                row = dict(module=mod_name, step=step_name, rank=rank, tokens=int(slots.shape[0]),
                           adapters=adapters, base_ms=base_ms, lora_ms=lora_ms, meta_ms=meta_ms,
                           split_k=cfg.split_k, block_m=meta.block_m)
                rows.append(row)
                print(f"{mod_name:8} {step_name:24} {rank:>4} {base_ms:9.4f} {lora_ms:9.4f} {meta_ms:8.4f} "
                      f"{lora_ms / base_ms:9.3f}")
    per_step = {}
    for rank in ranks:
        decode = [r for r in rows if r["rank"] == rank and r["step"] == steps[0][0]]
        base = sum(r["base_ms"] for r in decode) * (1 if args.smoke else 32)
        extra = sum(r["lora_ms"] for r in decode) * (1 if args.smoke else 32)
        per_step[rank] = dict(base_linear_ms=base, lora_ms=extra, ratio=base / (base + extra))
        print(f"per-step ({steps[0][0]}, rank {rank}): base linears {base:.3f} ms, LoRA {extra:.3f} ms, "
              f"linear-only throughput {base / (base + extra):.3f}x")
    sweep = [] if args.no_sweep else run_sweep(args, modules, device, dtype, max_loras)
    return dict(rows=rows, per_step=per_step, sweep=sweep)


def run_sweep(args: argparse.Namespace, modules: list, device: str, dtype: torch.dtype,
              max_loras: int) -> list[dict[str, Any]]:
    """split_k x block_k at decode (1 token; 64 tokens over 64 adapters), block_n for expand."""
    out: list[dict[str, Any]] = []
    cases = [("decode 1x1", [1], 1)] if args.smoke else [("decode 1x1", [1], 1), ("decode 64 / 64", [1] * 64, 64)]
    for mod_name, k, sizes in modules:
        w = weights(k, sizes, 16, max_loras, dtype, device)
        for step_name, lengths, adapters in cases:
            slots = make_step(lengths, adapters, max_loras, device)
            x = torch.randn(slots.shape[0], k, device=device).to(dtype)
            y = F.linear(x, w["base"])
            meta = lora.build_lora_batch_meta(slots, max_loras)
            best = None
            for split_k in (1, 2, 4, 8, 16):
                for block_k in (64, 128, 256):
                    for block_n in (32, 64, 128):
                        if split_k * block_k > k:
                            continue
                        cfg = lora.LoRAKernelConfig(split_k=split_k, block_k=block_k, block_n=block_n)
                        ms = bench(lambda: lora.lora_expand(
                            y, lora.lora_shrink(x, w["lora_a"], w["ranks"], meta, cfg), w["lora_b"], w["ranks"],
                            w["scaling"], meta, w["starts"], cfg), args.smoke)
                        if best is None or ms < best[0]:
                            best = (ms, cfg)
            assert best is not None
            heuristic = lora.lora_kernel_config(meta, k, len(sizes))
            out.append(dict(module=mod_name, step=step_name, best_ms=best[0], best=vars(best[1]),
                            heuristic=vars(heuristic)))
            print(f"sweep {mod_name:8} {step_name:16} best {best[0]:.4f} ms with {best[1]}; heuristic {heuristic}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (TRITON_INTERPRET=1)")
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("needs a CUDA device (or --smoke with TRITON_INTERPRET=1)")
    torch.manual_seed(0)
    result = run(args)
    path = write_json(result, args.out, "lora_kernels")
    if path:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
