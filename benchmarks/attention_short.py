"""Paged attention at batch 1 over short contexts (one stream's decode, a speculative verification of
k + 1 = 5 queries, a draft's decode): device us per call from a CUDA graph of 32 calls over 32
separate caches (a step's 32 layers), for decode tiles of BLOCK_N keys x num_stages, on the
Llama-3.1-8B target's and the Llama-3.2-1B draft's head layouts. These kernels are latency-bound at
a few hundred keys (~10 us per layer on the H200): fewer, wider KV tiles shorten each program's chain.

  python benchmarks/attention_short.py [--contexts 128,300,1000] [--out x.json]

Prints one line per (layout, context, query length, path) with every tile's time and the best;
AGENTSERVE_DECODE_TILE=keys,stages sets the engine's decode tile (kernels/paged_attention.decode_tile)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import device_name, write_json  # noqa: E402
from graph_timer import time_us  # noqa: E402
from kernel_bench import LLAMA_1B, LLAMA_8B, Shape, make_batch  # noqa: E402

from agentserve.kernels import paged_attention as pa  # noqa: E402
from agentserve.kernels._triton_utils import next_pow2, num_sms  # noqa: E402

# (BLOCK_N, num_stages): a stage holds a K and a V tile, so wider tiles take fewer stages.
TILES = [(32, 5), (64, 5), (64, 3), (128, 3), (128, 2), (256, 2), (256, 1)]
LAYERS = 32


def _calls(shape: Shape, ctx: int, q_len: int) -> list[tuple[Any, ...]]:
    """One argument set per layer: separate caches, as a step's layers read."""
    sets = []
    for _ in range(LAYERS):
        b = make_batch(shape, [q_len], [ctx], "cuda")
        sets.append((*b.args(), shape.head_dim ** -0.5, q_len, b.max_seq_len))
    return sets


def measure(shape: Shape, ctx: int, q_len: int) -> dict[str, Any]:
    sets = _calls(shape, ctx, q_len)
    seq = ctx + q_len
    group = shape.num_q_heads // shape.num_kv_heads
    row: dict[str, Any] = {"layout": shape.name, "context": ctx, "q_len": q_len, "unified": {}, "split": {}}
    splits = pa.num_kv_splits(1, seq, shape.num_kv_heads, num_sms(torch.device("cuda")))
    for block_n, stages in TILES:
        key = f"{block_n}x{stages}"
        cfg = pa.AttnConfig(max(16, next_pow2(q_len * group)), block_n, 4, stages)
        try:
            row["unified"][key] = time_us(pa.paged_attention_triton, sets, iters=LAYERS, config=cfg)
        except Exception as e:  # out of shared memory: the tile does not fit
            row["unified"][key] = f"{type(e).__name__}"
        if q_len == 1 and splits > 1:
            try:
                row["split"][key] = time_us(pa.paged_attention_decode_split_triton, sets, iters=LAYERS,
                                            num_splits=splits, block_n=block_n, num_stages=stages)
            except Exception as e:
                row["split"][key] = f"{type(e).__name__}"
    row["splits"] = splits
    return row


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="128,300,1000")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs CUDA")
        return 0
    rows = []
    for shape in (LLAMA_8B, LLAMA_1B):
        for ctx in (int(c) for c in args.contexts.split(",")):
            for q_len in (1, 5):
                row = measure(shape, ctx, q_len)
                rows.append(row)
                for path in ("unified", "split"):
                    timed = {k: v for k, v in row[path].items() if isinstance(v, float)}
                    if timed:
                        best = min(timed, key=timed.__getitem__)
                        cells = " ".join(f"{k} {v:.1f}" for k, v in row[path].items() if isinstance(v, float))
                        print(f"  {shape.name} ctx={ctx} q={q_len} {path}"
                              f"{' S=' + str(row['splits']) if path == 'split' else ''}: {cells} us; best {best}",
                              flush=True)
    write_json({"benchmark": "attention_short", "device": device_name(), "tiles": TILES, "rows": rows},
               args.out, "attention_short")
    return 0


if __name__ == "__main__":
    sys.exit(main())
