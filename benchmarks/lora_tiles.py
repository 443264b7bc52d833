"""LoRA shrink + expand tiles timed the way a decode step runs them (issue #13): inside a CUDA graph,
32 layers in a row, each with its own adapter weights (so they come from HBM, not L2), with PDL
launches as in the engine. benchmarks/lora_kernels.py's sweep timed eager calls, where the launch
path and L2 hits swamp kernels of a few microseconds; lora_profile.py showed the kernels of the
512-adapter workload's step (128 rows over 64 adapters, 2 rows each) taking 2.16 ms per step for
1.7 GB of adapter weights (~0.8 TB/s): a tiling question this script answers per step shape.

  python benchmarks/lora_tiles.py [--out tiles.json]
  TRITON_INTERPRET=1 python benchmarks/lora_tiles.py --smoke   # CPU: the plumbing only

Prints, per (step shape, module), the heuristic's time and the best swept config's, in us per layer.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from typing import Any, Callable

import torch

from agentserve.kernels import lora

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _results import write_json  # noqa: E402
from graph_timer import graph_replay_us  # noqa: E402

MODULES = [("qkv", 4096, [4096, 1024, 1024]), ("o", 4096, [4096])]
SMOKE_MODULES = [("qkv", 64, [64, 16, 16])]
# (name, tokens, adapters): one stream; the 64-adapter throughput rows; the 512-adapter workload's step.
CASES = [("128 / 64", 128, 64), ("1 / 1", 1, 1), ("256 / 64", 256, 64)]
SMOKE_CASES = [("4 / 2", 4, 2)]
SPLITS, BLOCK_KS, BLOCK_NS, WARPS = (2, 4, 8, 16), (128, 256), (64, 128, 256), (4,)


def timed_layers(run_layer: Callable[[int], None], layers: int, smoke: bool) -> float:
    """Microseconds per layer: `layers` calls captured in one CUDA graph, replayed (eager on the CPU)."""
    if smoke:
        t0 = time.perf_counter()
        for i in range(layers):
            run_layer(i)
        return (time.perf_counter() - t0) * 1e6 / layers

    def all_layers() -> None:
        for i in range(layers):
            run_layer(i)

    return graph_replay_us(all_layers, reps=20) / layers


def sweep_case(module: tuple[str, int, list[int]], tokens: int, adapters: int, layers: int, max_loras: int,
               smoke: bool) -> dict[str, Any]:
    _, k, sizes = module
    device, dtype = ("cpu", torch.float16) if smoke else ("cuda", torch.bfloat16)
    n, rank = sum(sizes), 16
    a = [torch.randn(max_loras, len(sizes), rank, k, device=device).to(dtype) * 0.01 for _ in range(layers)]
    b = [torch.randn(max_loras, rank, n, device=device).to(dtype) * 0.01 for _ in range(layers)]
    ranks = torch.full((max_loras, len(sizes)), rank, dtype=torch.int32, device=device)
    scaling = torch.full((max_loras, len(sizes)), 2.0, device=device)
    starts = lora.slice_starts_for(sizes, torch.device(device))
    # Requests in order, adapter i % adapters: each adapter's rows spread over the batch, as admitted.
    slots = torch.tensor([i % adapters for i in range(tokens)], dtype=torch.int32, device=device)
    x = torch.randn(tokens, k, device=device).to(dtype)
    y = torch.zeros(tokens, n, device=device, dtype=dtype)
    meta = lora.build_lora_batch_meta(slots, max_loras)

    def time_config(cfg: lora.LoRAKernelConfig) -> float:
        def layer(i: int) -> None:
            lora.lora_expand(y, lora.lora_shrink(x, a[i], ranks, meta, cfg), b[i], ranks, scaling, meta, starts, cfg)
        return timed_layers(layer, layers, smoke)

    heuristic = lora.lora_kernel_config(meta, k, len(sizes))
    heuristic = lora.LoRAKernelConfig(split_k=heuristic.split_k, block_k=heuristic.block_k,
                                      block_n=lora.expand_block_n(meta, n), num_warps=heuristic.num_warps)
    results = {"heuristic": vars(heuristic), "heuristic_us": time_config(heuristic)}
    # The tiles before the seventh session (split-K until 2 programs per SM, 64-column expand tiles).
    split = 1
    while split < lora.MAX_SPLIT_K and meta.max_blocks * len(sizes) * split < 2 * 132 and k >= 2 * split * 256:
        split *= 2
    results["previous_us"] = time_config(lora.LoRAKernelConfig(split_k=split, block_k=heuristic.block_k, block_n=64))
    grid = [(1, 64, 64, 4)] if smoke else [
        (s, bk, bn, w) for s, bk, bn, w in itertools.product(SPLITS, BLOCK_KS, BLOCK_NS, WARPS) if s * bk <= k]
    best: tuple[float, dict[str, int]] = (float("inf"), {})
    for split_k, block_k, block_n, warps in grid:
        cfg = lora.LoRAKernelConfig(split_k=split_k, block_k=block_k, block_n=block_n, num_warps=warps)
        us = time_config(cfg)
        if us < best[0]:
            best = (us, vars(cfg))
    results.update(best_us=best[0], best=best[1])
    adapter_bytes = adapters * rank * (len(sizes) * k + n) * 2  # A and B of the adapters the step uses
    results["adapter_gb_s_best"] = adapter_bytes / (best[0] * 1e-6) / 1e9
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("needs a CUDA device (or --smoke with TRITON_INTERPRET=1)")
    torch.manual_seed(0)
    modules, cases = (SMOKE_MODULES, SMOKE_CASES) if args.smoke else (MODULES, CASES)
    layers, max_loras = (2, 4) if args.smoke else (args.layers, 64)
    rows = []
    print(f"{'step':10} {'module':6} {'previous us':>12} {'heuristic us':>13} {'best us':>8}  best config "
          "(split_k, block_k, block_n, warps)")
    for (case, tokens, adapters), module in itertools.product(cases, modules):
        r = sweep_case(module, tokens, adapters, layers, max_loras, args.smoke)
        r.update(step=case, module=module[0])
        rows.append(r)
        b = r["best"]
        print(f"{case:10} {module[0]:6} {r['previous_us']:12.2f} {r['heuristic_us']:13.2f} {r['best_us']:8.2f}  "
              f"({b['split_k']}, {b['block_k']}, {b['block_n']}, {b['num_warps']}); {r['adapter_gb_s_best']:.0f} GB/s")
    path = write_json({"benchmark": "lora_tiles", "rows": rows}, args.out, "lora_tiles")
    if path:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
