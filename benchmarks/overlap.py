"""Can a large-batch decode step hide its attention's KV reads under its GEMMs? (#16 throughput: the
direction for the next step design, not a figure of the engine.)

The throughput workload's decode steps take about (cuBLAS GEMMs) + (attention's KV reads) today, one after
the other in each layer (benchmarks/NOTES.md: batch 256 ~6.2 + ~3.3 ms). Two micro-batches of half the rows
can overlap them, NanoFlow-style: while one half's attention streams its KV (bandwidth-bound), the other
half's projections run (compute-bound), on two streams of one CUDA graph. The price: each GEMM sees half
the rows (lower efficiency, weights read twice per step). This times, over `--layers` layers of distinct
Llama-3.1-8B-shaped weights and KV caches (decode rows, contexts drawn from `--context`):
  full      the step as the engine runs it: GEMMs over all rows, attention, per layer on one stream
  halves    two half-batches one after the other on one stream (micro-batching without overlap)
  overlap   the two halves pipelined on two streams (half A's attention beside half B's qkv GEMM, half B's
            attention beside half A's o / gate_up / down)
and the parts alone (GEMMs over all rows, over half the rows twice, attention of all rows). The GEMMs are
F.linear (cuBLAS) at the 8B's projection shapes; the attention the engine's paged decode dispatcher.
Elementwise kernels (norms, rotary, SiLU) are left out of every variant alike.

  python benchmarks/overlap.py [--batches 256,512,1024] [--context 64,768] [--layers 32] [--out x.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import device_name, write_json  # noqa: E402
from decode_rows_args import add_decode_rows_args, parse_decode_rows_args  # noqa: E402
from graph_timer import graph_replay_us  # noqa: E402
from kernel_bench import LLAMA_8B, make_batch  # noqa: E402

from agentserve.kernels import paged_attention as pa  # noqa: E402

HIDDEN, INTER, QKV = 4096, 14336, 6144


def _weights(num_layers: int) -> list[dict[str, torch.Tensor]]:
    shapes = {"qkv": (QKV, HIDDEN), "o": (HIDDEN, HIDDEN), "gate_up": (2 * INTER, HIDDEN), "down": (HIDDEN, INTER)}
    return [{name: torch.randn(*shape, device="cuda", dtype=torch.bfloat16) / shape[1] ** 0.5
             for name, shape in shapes.items()} for _ in range(num_layers)]


class Rows:
    """A batch's (or micro-batch's) activations for the four projections."""

    def __init__(self, rows: int) -> None:
        self.x = torch.randn(rows, HIDDEN, device="cuda", dtype=torch.bfloat16)
        self.qkv = torch.empty(rows, QKV, device="cuda", dtype=torch.bfloat16)
        self.h = torch.empty(rows, HIDDEN, device="cuda", dtype=torch.bfloat16)
        self.gate_up = torch.empty(rows, 2 * INTER, device="cuda", dtype=torch.bfloat16)
        self.act = torch.randn(rows, INTER, device="cuda", dtype=torch.bfloat16)

    def qkv_gemm(self, w: dict[str, torch.Tensor]) -> None:
        torch.matmul(self.x, w["qkv"].t(), out=self.qkv)

    def mlp_gemms(self, w: dict[str, torch.Tensor]) -> None:
        torch.matmul(self.x, w["o"].t(), out=self.h)
        torch.matmul(self.h, w["gate_up"].t(), out=self.gate_up)
        torch.matmul(self.act, w["down"].t(), out=self.x)


class HalfBatch(Rows):
    """A micro-batch: its activations and, per layer, its decode rows' paged KV."""

    def __init__(self, rows: int, contexts: list[int], num_layers: int) -> None:
        super().__init__(rows)
        self.kv = [make_batch(LLAMA_8B, [1] * rows, [c - 1 for c in contexts], "cuda") for _ in range(num_layers)]

    def attention(self, layer: int) -> None:
        b = self.kv[layer]
        pa.paged_attention(b.q, b.k_cache, b.v_cache, b.block_tables, b.query_start_loc, b.seq_lens,
                           LLAMA_8B.head_dim ** -0.5, 1, b.max_seq_len)


class Variants:
    """The step variants and the parts alone, each one capturable call over every layer."""

    def __init__(self, weights: list[dict[str, torch.Tensor]], a: HalfBatch, b: HalfBatch) -> None:
        self.weights, self.a, self.b = weights, a, b
        self.all_rows = Rows(a.x.shape[0] + b.x.shape[0])
        self.side = torch.cuda.Stream()

    def full(self) -> None:
        for i, w in enumerate(self.weights):
            self.all_rows.qkv_gemm(w)
            self.a.attention(i)  # all rows' attention, as two launches over the halves' pages
            self.b.attention(i)
            self.all_rows.mlp_gemms(w)

    def halves(self) -> None:
        for i, w in enumerate(self.weights):
            for half in (self.a, self.b):
                half.qkv_gemm(w)
                half.attention(i)
                half.mlp_gemms(w)

    def overlap(self) -> None:
        main, side, a, b = torch.cuda.current_stream(), self.side, self.a, self.b
        side.wait_stream(main)
        for i, w in enumerate(self.weights):
            a.qkv_gemm(w)
            side.wait_event(main.record_event())
            with torch.cuda.stream(side):
                a.attention(i)
                attn_a = side.record_event()
            b.qkv_gemm(w)  # beside half A's attention
            side.wait_event(main.record_event())
            with torch.cuda.stream(side):
                b.attention(i)  # beside half A's o / gate_up / down
                attn_b = side.record_event()
            main.wait_event(attn_a)
            a.mlp_gemms(w)
            main.wait_event(attn_b)
            b.mlp_gemms(w)
        main.wait_stream(side)

    def gemms_full(self) -> None:
        for w in self.weights:
            self.all_rows.qkv_gemm(w)
            self.all_rows.mlp_gemms(w)

    def gemms_halves(self) -> None:
        for w in self.weights:
            for half in (self.a, self.b):
                half.qkv_gemm(w)
                half.mlp_gemms(w)

    def attention(self) -> None:
        for i in range(len(self.weights)):
            self.a.attention(i)
            self.b.attention(i)

    def all(self) -> dict[str, Callable[[], None]]:
        return {"full": self.full, "halves": self.halves, "overlap": self.overlap, "gemms_full": self.gemms_full,
                "gemms_halves": self.gemms_halves, "attention": self.attention}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_decode_rows_args(ap, batches="256,512,1024", context="64,768")
    ap.add_argument("--layers", type=int, default=32)
    parsed = parse_decode_rows_args(ap, argv)
    if parsed is None:
        return 0
    args, batches, lo, hi = parsed
    weights = _weights(args.layers)
    gen = torch.Generator().manual_seed(0)
    rows_out = []
    for batch in batches:
        contexts = torch.randint(lo, hi + 1, (batch,), generator=gen).tolist()
        half = batch // 2
        a = HalfBatch(half, contexts[:half], args.layers)
        b = HalfBatch(batch - half, contexts[half:], args.layers)
        ms = {}
        for name, fn in Variants(weights, a, b).all().items():
            try:
                ms[name] = graph_replay_us(fn, reps=5) / 1e3
            except RuntimeError as e:  # one variant's failure (capture, memory) leaves the others' figures
                print(f"  batch {batch} {name}: {type(e).__name__}: {e}")
                ms[name] = float("nan")
        kv_gb = sum(contexts) * 2 * LLAMA_8B.num_kv_heads * LLAMA_8B.head_dim * 2 * args.layers / 1e9
        row = {"batch": batch, "mean_context": sum(contexts) / batch, "kv_gb_per_step": kv_gb, **ms,
               "overlap_vs_full": ms["overlap"] / ms["full"]}
        rows_out.append(row)
        print(f"  batch {batch} (mean context {row['mean_context']:.0f}, KV {kv_gb:.1f} GB per step), ms per step of "
              f"{args.layers} layers: full {ms['full']:.2f}, halves {ms['halves']:.2f}, overlap {ms['overlap']:.2f} "
              f"({row['overlap_vs_full']:.2f}x full); parts: GEMMs over all rows {ms['gemms_full']:.2f}, over halves "
              f"{ms['gemms_halves']:.2f}, attention {ms['attention']:.2f}")
        del a, b
        torch.cuda.empty_cache()
    result: dict[str, Any] = {"benchmark": "overlap", "device": device_name(), "layers": args.layers,
                              "context": [lo, hi], "rows": rows_out}
    write_json(result, args.out, "overlap")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
