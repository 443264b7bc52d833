"""Decode attention at the throughput workload's batch: does the order of the rows (and the tile) decide how
close it reads to the HBM rate? (#16 throughput.)

benchmarks/overlap.py measured the engine's paged decode attention at 3.3 TB/s over 256 rows of 64-768
keys against 3.9 TB/s over 1,024 rows: the 2,048 programs of batch 256 (one per row and KV head, one CTA
per SM with 128-key tiles x 2 stages) run ~15 waves whose lengths vary 12x, so the last waves' stragglers
may be what is lost. This times, per layer (graph_timer over separate caches), the unified decode kernel
over the same rows in three orders: as drawn (the engine's rows are in slot order, not by length),
longest first (the long programs start in the first waves, the short ones fill the tail) and shortest
first; with a few tiles (block_n x stages x warps) that hold fewer bytes of shared memory per CTA, so more
CTAs share an SM; and split-KV with 2 splits (even program lengths, one reduce launch more).

  python benchmarks/attention_order.py [--batches 256,512] [--context 64,767] [--out x.json]
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path
from typing import Any, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import device_name, write_json  # noqa: E402
from decode_rows_args import add_decode_rows_args, parse_decode_rows_args  # noqa: E402
from attention_mixed import paged_arg_sets, time_tile_us  # noqa: E402
from kernel_bench import LLAMA_8B  # noqa: E402

from agentserve.kernels import paged_attention as pa  # noqa: E402

# (block_n, num_stages, num_warps): the engine's decode tile first
TILES = [(128, 2, 4), (128, 2, 8), (128, 1, 4), (64, 2, 4), (64, 3, 4)]


def _orders(contexts: list[int]) -> dict[str, list[int]]:
    return {"drawn": contexts, "longest_first": sorted(contexts, reverse=True), "shortest_first": sorted(contexts)}


def measure(batch: int, lo: int, hi: int) -> dict[str, Any]:
    rng = random.Random(batch)
    contexts = [rng.randint(lo, hi) for _ in range(batch)]
    group = LLAMA_8B.num_q_heads // LLAMA_8B.num_kv_heads
    kv_bytes = sum(contexts) * LLAMA_8B.num_kv_heads * LLAMA_8B.head_dim * 2 * 2
    row: dict[str, Any] = {"batch": batch, "mean_context": sum(contexts) / batch, "kv_gb": kv_bytes / 1e9, "us": {}}
    for order, ctx in _orders(contexts).items():
        sets = paged_arg_sets(LLAMA_8B, [1] * len(ctx), [c - 1 for c in ctx])  # one batch per order, every tile
        for block_n, stages, warps in TILES:
            cfg = pa.AttnConfig(max(16, group), block_n, warps, stages)
            row["us"][f"{order} {block_n}x{stages}w{warps}"] = time_tile_us(pa.paged_attention_triton, sets, config=cfg)
        row["us"][f"{order} split2"] = time_tile_us(pa.paged_attention_decode_split_triton, sets, num_splits=2)
        del sets
    return row


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_decode_rows_args(ap, batches="256,512", context="64,767")
    parsed = parse_decode_rows_args(ap, argv)
    if parsed is None:
        return 0
    args, batches, lo, hi = parsed
    rows = []
    for batch in batches:
        row = measure(batch, lo, hi)
        rows.append(row)
        cells = " ".join(f"{k} {v:.1f} ({row['kv_gb'] / v * 1e3:.2f})" if isinstance(v, float) else f"{k} {v}"
                         for k, v in row["us"].items())
        print(f"  batch {batch} (mean context {row['mean_context']:.0f}, {row['kv_gb']:.3f} GB of K+V per layer), "
              f"us per layer (TB/s): {cells}")
        torch.cuda.empty_cache()
    write_json({"benchmark": "attention_order", "device": device_name(), "context": [lo, hi], "rows": rows},
               args.out, "attention_order")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
