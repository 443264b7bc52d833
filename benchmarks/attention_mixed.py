"""Paged attention at the agent loop's shapes and the throughput batch, per tile: device us per layer
from a CUDA graph over separate caches (graph_timer.time_us), on the Llama-3.1-8B layout.

- decode_long: 27 decode rows over 2k-11k-token contexts (the agent loop's decode-only steps), split at
  the engine's count (SPLIT_LONG) and unsplit, per decode tile (BLOCK_N x stages);
- prefill tiles (BLOCK_M x BLOCK_N x warps x stages), with the effective attention TFLOP/s: mixed_long
  (26 decode rows plus 8 prefill chunks of 200 tokens over 2k-11k-token contexts) and mixed_turns (the
  same decode rows plus turns of 1,100 and 560 tokens: the agent loop's steps with prefill, ~1,660 new
  tokens each), a 2,048-token chunk after 6,144 cached tokens, a whole 8,192-token prompt, and 16
  prompts of 64-512 tokens (the throughput workload's prefill);
- decode_batch256: 256 decode rows over 64-512-token contexts (the throughput workload), per decode tile.

  python benchmarks/attention_mixed.py [--out x.json]

The engine's tiles: kernels/paged_attention.attention_config / decode_tile."""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import device_name, write_json  # noqa: E402
from graph_timer import time_us  # noqa: E402
from kernel_bench import LLAMA_8B, Shape, make_batch  # noqa: E402

from agentserve.kernels import paged_attention as pa  # noqa: E402
from agentserve.kernels._triton_utils import num_sms  # noqa: E402

DECODE_TILES = [(64, 5), (64, 3), (128, 3), (128, 2), (256, 2)]
# (BLOCK_M, BLOCK_N, num_warps, num_stages); the first is the engine's prefill tile, the second the earlier one.
PREFILL_TILES = [(64, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 4), (64, 128, 4, 2),
                 (64, 32, 4, 4), (32, 64, 4, 3)]
SPLIT_COUNTS = (2, 3, 4, 5, 6, 8, 12)
SETS = 4  # separate caches per graph (each set is larger than the L2)


def _paged_arg_sets(shape: Shape, q_lens: list[int], ctx_lens: list[int]) -> list[tuple[Any, ...]]:
    """SETS random paged batches of these rows (new and cached tokens), as the attention kernels' arguments."""
    out = []
    for _ in range(SETS):
        b = make_batch(shape, q_lens, ctx_lens, "cuda")
        out.append((*b.args(), shape.head_dim ** -0.5, max(q_lens), b.max_seq_len))
    return out


def _time_tile_us(fn: Callable[..., Any], sets: list[tuple[Any, ...]], **kw: Any) -> Any:
    """Device us per call of fn over the sets (graph_timer), or the error's name for a tile that cannot run."""
    try:
        return time_us(fn, sets, iters=4 * SETS, **kw)
    except Exception as e:  # a tile that does not fit shared memory
        return type(e).__name__


def _contexts(n: int, lo: int, hi: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(lo, hi) for _ in range(n)]


def decode_rows(name: str, shape: Shape, ctx: list[int], split: bool) -> dict[str, Any]:
    sets = _paged_arg_sets(shape, [1] * len(ctx), ctx)
    group = shape.num_q_heads // shape.num_kv_heads
    row: dict[str, Any] = {"case": name, "rows": len(ctx), "mean_context": sum(ctx) / len(ctx), "unified": {}}
    for block_n, stages in DECODE_TILES:
        cfg = pa.AttnConfig(max(16, group), block_n, 4, stages)
        row["unified"][f"{block_n}x{stages}"] = _time_tile_us(pa.paged_attention_triton, sets, config=cfg)
    if split:
        saved = pa.SPLIT_LONG
        pa.SPLIT_LONG = True
        splits = pa.num_kv_splits(len(ctx), max(ctx) + 1, shape.num_kv_heads, num_sms(torch.device("cuda")))
        pa.SPLIT_LONG = saved
        row["splits"] = splits
        row["split"] = {f"{n}x{s}": _time_tile_us(pa.paged_attention_decode_split_triton, sets, num_splits=splits,
                                           block_n=n, num_stages=s) for n, s in DECODE_TILES}
        # The split count at the engine's decode tile: waves of programs against keys per program (the
        # sessions' decode-only steps spend ~half their device time here: benchmarks/NOTES.md, 21st session).
        block_n, stages = pa.decode_tile(shape.head_dim)
        row["split_counts"] = {str(n): _time_tile_us(pa.paged_attention_decode_split_triton, sets, num_splits=n,
                                                     block_n=block_n, num_stages=stages) for n in SPLIT_COUNTS}
    kv_bytes = sum(ctx) * shape.num_kv_heads * shape.head_dim * 2 * 2
    row["kv_gb"] = kv_bytes / 1e9
    return row


def prefill_rows(shape: Shape, case: str, q_lens: list[int], ctx_lens: list[int]) -> dict[str, Any]:
    """One step's prefill-tile attention: us per layer per tile and the effective TFLOP/s (causal)."""
    sets = _paged_arg_sets(shape, q_lens, ctx_lens)
    flops = sum(4 * q * (c + q / 2) * shape.num_q_heads * shape.head_dim for q, c in zip(q_lens, ctx_lens))
    row: dict[str, Any] = {"case": case, "new_tokens": sum(q_lens), "rows": len(q_lens), "gflop": flops / 1e9,
                           "tiles": {}}
    for m, n, warps, stages in PREFILL_TILES:
        t = _time_tile_us(pa.paged_attention_triton, sets, config=pa.AttnConfig(m, n, warps, stages))
        row["tiles"][f"{m}x{n}w{warps}s{stages}"] = t
    return row


def prefill_cases() -> list[tuple[str, list[int], list[int]]]:
    """(case, new tokens per row, cached tokens per row): the agent loop's mixed steps, a chunk of a long
    prompt after 6k cached tokens, a whole 8k prompt (the unified path when SDPA does not take it),
    and the throughput workload's prompts (16 of 64-512 tokens, nothing cached)."""
    short = _contexts(16, 64, 512, 5)
    decode_ctx = _contexts(26, 2000, 11000, 2)
    return [("mixed_long", [200] * 8 + [1] * 26, _contexts(8, 2000, 11000, 1) + decode_ctx),
            ("mixed_turns", [1100, 560] + [1] * 26, _contexts(2, 2000, 11000, 6) + decode_ctx),
            ("chunk_2048_after_6144", [2048], [6144]),
            ("prompt_8192", [8192], [0]),
            ("prompts_64_512", short, [0] * len(short))]


def _print_tiles(label: str, tiles: dict[str, Any], extra: str = "") -> None:
    timed = {k: v for k, v in tiles.items() if isinstance(v, float)}
    cells = " ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in tiles.items())
    best = min(timed, key=timed.__getitem__) if timed else "-"
    print(f"  {label}: {cells} us; best {best}{extra}", flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs CUDA")
        return 0
    shape = LLAMA_8B
    rows = []
    long_ctx = _contexts(27, 2000, 11000, 3)
    for name, ctx, split in (("decode_long", long_ctx, True), ("decode_batch256", _contexts(256, 64, 512, 4), False)):
        row = decode_rows(name, shape, ctx, split)
        rows.append(row)
        _print_tiles(f"{name} unified", row["unified"], f" ({row['kv_gb']:.2f} GB of K+V)")
        if split:
            _print_tiles(f"{name} split S={row['splits']}", row["split"])
            _print_tiles(f"{name} split counts", row["split_counts"])
        torch.cuda.empty_cache()
    for case, q_lens, ctx_lens in prefill_cases():
        row = prefill_rows(shape, case, q_lens, ctx_lens)
        rows.append(row)
        timed = [v for v in row["tiles"].values() if isinstance(v, float)]
        best = min(timed) if timed else float("nan")
        _print_tiles(f"{case} prefill tiles", row["tiles"],
                     f" ({row['gflop']:.0f} GFLOP: {row['gflop'] / best * 1e3:.0f} TFLOP/s at the best)")
        torch.cuda.empty_cache()
    write_json({"benchmark": "attention_mixed", "device": device_name(), "rows": rows}, args.out, "attention_mixed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
