"""Per-kernel benchmark of the Triton kernels on an H100 (or any CUDA GPU) against its ceilings.

    python benchmarks/kernels.py                 # full run, table on stdout, JSON to --out
    python benchmarks/kernels.py --no-sweep      # skip the tile-config sweep
    python benchmarks/kernels.py --only gemv,elementwise   # just those sections (decode,prefill,elementwise,gemv,sweep)
    TRITON_INTERPRET=1 python benchmarks/kernels.py --smoke   # CPU: tiny shapes, checks the script runs

Reports:
- decode attention (Llama-3.1-8B: 32 q / 8 kv heads, head_dim 128, page 16, bf16) at batch
  1/16/64/256 x context 512..8192, unsplit vs split-KV (the heuristic's split count and the best of
  a sweep), as achieved bandwidth = K+V bytes of every context / time, against 3.0 TB/s;
- the split-KV crossover: per batch, the shortest context at which splitting wins by > 5%, and
  whether `use_split_kv` agrees; plus the same for two more shapes (Llama-3.2-1B: head_dim 64;
  Qwen2.5-7B: 28 q / 4 kv heads);
- prefill attention: one 8192-token prompt, 512-token chunks over 0/2048/7680-token prefixes and a
  batch of 16 fresh 512-token prompts, as TFLOP/s against 781 (bf16 dense). FLOPs are counted
  causally: query at position p costs 4 * head_dim * (p + 1) per head (QK^T and PV), nothing for
  masked-out keys;
- rms_norm(+residual), silu_and_mul, rotary and write_kv bandwidth (bytes each kernel must move)
  next to the torch reference's time, and the fused rotary + KV write against rotary then write_kv;
- gemv: the Triton GEMV/skinny GEMM against F.linear (cuBLAS) on the 8B decode projections at
  M = 1/2/4/8 and the per-step linear-layer total (benchmarks/gemv_section.py);
- a tile sweep (decode BLOCK_N x num_stages, prefill BLOCK_M x BLOCK_N x warps x stages).

Timing: triton.testing.do_bench, median, L2 flushed before each run (so KV comes from HBM).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import torch

from agentserve.kernels import activation, kv_write, rmsnorm, rope_kv_write, rotary
from agentserve.kernels import paged_attention as pa
from agentserve.kernels._triton_utils import HAS_TRITON, num_sms

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gemv_section  # noqa: E402

# Random paged batches are built by the kernel tests' helper (tests/helpers/paged_batch.py).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from helpers.paged_batch import PagedBatch, random_paged_batch  # noqa: E402

PEAK_BW_TBS = 3.0        # H100 SXM HBM3, measured copy bandwidth (issue 3)
PEAK_TFLOPS = 781.0      # H100 SXM bf16 dense matmul, measured (issue 3)


@dataclass
class Shape:
    name: str
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int = 16
    dtype: torch.dtype = torch.bfloat16


LLAMA_8B = Shape("llama-3.1-8b", 32, 8, 128)
LLAMA_1B = Shape("llama-3.2-1b", 32, 8, 64)
QWEN_7B = Shape("qwen2.5-7b", 28, 4, 128)


@dataclass
class Timer:
    device: str
    results: dict[str, Any] = field(default_factory=dict)

    def ms(self, fn: Callable[[], Any]) -> float:
        if self.device != "cuda":  # smoke mode on CPU: one timed call, the numbers mean nothing
            fn()
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        import triton.testing

        try:
            return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
        except TypeError:  # older triton without return_mode
            return float(triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5])[0])


def kv_bytes(seq_lens: list[int], shape: Shape) -> int:
    return sum(seq_lens) * 2 * shape.num_kv_heads * shape.head_dim * torch.finfo(shape.dtype).bits // 8


def causal_flops(q_lens: list[int], ctx_lens: list[int], shape: Shape) -> float:
    keys_seen = 0
    for q, c in zip(q_lens, ctx_lens):
        keys_seen += q * c + q * (q + 1) // 2  # query i of the chunk sees c + i + 1 keys
    return 4.0 * shape.num_q_heads * shape.head_dim * keys_seen


def make_batch(shape: Shape, q_lens: list[int], ctx_lens: list[int], device: str) -> PagedBatch:
    return random_paged_batch(q_lens, ctx_lens, shape.num_q_heads, shape.num_kv_heads, shape.head_dim,
                              shape.page_size, shape.dtype, device, poison=False, seed=0)


def free(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------
# Decode attention and the split-KV crossover
# ------------------------------------------------------------------------------------------------

def bench_decode(timer: Timer, shape: Shape, batches: list[int], contexts: list[int], split_counts: list[int],
                 sms: int, device: str) -> list[dict[str, Any]]:
    rows = []
    scale = shape.head_dim ** -0.5
    for batch in batches:
        for ctx in contexts:
            # Context lengths ctx - 1 cached + 1 new token: every request at exactly `ctx` keys.
            b = make_batch(shape, [1] * batch, [ctx - 1] * batch, device)
            args = (*b.args(), scale, 1, b.max_seq_len)
            nbytes = kv_bytes([ctx] * batch, shape)
            t_unsplit = timer.ms(lambda args=args: pa.paged_attention_triton(*args))
            heur_splits = pa.num_kv_splits(batch, ctx, shape.num_kv_heads, sms)
            sweep: dict[int, float] = {}
            for s in sorted(set(split_counts) | {heur_splits}):
                if s <= 1:
                    continue
                sweep[s] = timer.ms(lambda s=s, args=args: pa.paged_attention_decode_split_triton(*args, num_splits=s))
            best_s, t_best_split = min(sweep.items(), key=lambda kv: kv[1]) if sweep else (1, float("inf"))
            t_dispatch = sweep[heur_splits] if heur_splits > 1 else t_unsplit
            t_best = min(t_unsplit, t_best_split)
            rows.append(dict(
                shape=shape.name, batch=batch, context=ctx, kv_bytes=nbytes,
                unsplit_ms=t_unsplit, unsplit_tbs=nbytes / t_unsplit / 1e9,
                heuristic_splits=heur_splits, heuristic_ms=t_dispatch, heuristic_tbs=nbytes / t_dispatch / 1e9,
                best_splits=best_s if t_best_split < t_unsplit else 1, best_ms=t_best,
                best_tbs=nbytes / t_best / 1e9, split_sweep_ms={str(k): v for k, v in sweep.items()},
                heuristic_within_5pct_of_best=t_dispatch <= 1.05 * t_best,
            ))
            r = rows[-1]
            print(f"  decode {shape.name:13s} B={batch:4d} ctx={ctx:5d}  unsplit {r['unsplit_ms']*1e3:8.1f}us "
                  f"{r['unsplit_tbs']:5.2f}TB/s | heuristic S={heur_splits:2d} {r['heuristic_tbs']:5.2f}TB/s | "
                  f"best S={r['best_splits']:2d} {r['best_tbs']:5.2f}TB/s ({r['best_tbs']/PEAK_BW_TBS:5.1%} of peak)",
                  flush=True)
            del b, args
            free(device)
    return rows


def split_crossover(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per (shape, batch): the shortest context where the best split beats unsplit by > 5%."""
    out: dict[str, Any] = {}
    for r in rows:
        key = f"{r['shape']}/B={r['batch']}"
        entry = out.setdefault(key, {"split_wins_from_context": None, "contexts": {}, "heuristic_agrees": True})
        wins = r["best_splits"] > 1 and r["best_ms"] < 0.95 * r["unsplit_ms"]
        entry["contexts"][str(r["context"])] = {"split_wins": wins, "best_splits": r["best_splits"],
                                                "speedup": r["unsplit_ms"] / r["best_ms"]}
        if wins and entry["split_wins_from_context"] is None:
            entry["split_wins_from_context"] = r["context"]
        if (r["heuristic_splits"] > 1) != wins and not r["heuristic_within_5pct_of_best"]:
            entry["heuristic_agrees"] = False
    return out


# ------------------------------------------------------------------------------------------------
# Prefill attention
# ------------------------------------------------------------------------------------------------

def bench_prefill(timer: Timer, shape: Shape, cases: list[tuple[str, list[int], list[int]]],
                  device: str, config: Optional[pa.AttnConfig] = None) -> list[dict[str, Any]]:
    rows = []
    scale = shape.head_dim ** -0.5
    for name, q_lens, ctx_lens in cases:
        b = make_batch(shape, q_lens, ctx_lens, device)
        args = (*b.args(), scale, b.max_query_len, b.max_seq_len)
        t = timer.ms(lambda args=args: pa.paged_attention_triton(*args, config=config))
        flops = causal_flops(q_lens, ctx_lens, shape)
        rows.append(dict(shape=shape.name, case=name, ms=t, flops=flops, tflops=flops / t / 1e9,
                         kv_bytes=kv_bytes([q + c for q, c in zip(q_lens, ctx_lens)], shape)))
        print(f"  prefill {shape.name:13s} {name:34s} {t*1e3:9.1f}us {rows[-1]['tflops']:6.1f} TFLOP/s "
              f"({rows[-1]['tflops']/PEAK_TFLOPS:5.1%} of {PEAK_TFLOPS:.0f})", flush=True)
        del b, args
        free(device)
    return rows


def prefill_cases(smoke: bool) -> list[tuple[str, list[int], list[int]]]:
    if smoke:
        return [("prompt 40", [40], [0]), ("chunk 16 after 24", [16], [24])]
    return [
        ("prompt 8192", [8192], [0]),
        ("chunk 512 after 0", [512], [0]),
        ("chunk 512 after 2048", [512], [2048]),
        ("chunk 512 after 7680", [512], [7680]),
        ("16 prompts x 512", [512] * 16, [0] * 16),
        ("mixed: chunk 512 after 1024 + 255 decodes@1024", [512] + [1] * 255, [1024] + [1023] * 255),
    ]


# ------------------------------------------------------------------------------------------------
# Elementwise kernels
# ------------------------------------------------------------------------------------------------

def bench_elementwise(timer: Timer, shape: Shape, tokens_list: list[int], hidden: int, inter: int,
                      device: str) -> list[dict[str, Any]]:
    rows = []
    dt = shape.dtype
    esize = torch.finfo(dt).bits // 8
    hq, hkv, d = shape.num_q_heads, shape.num_kv_heads, shape.head_dim
    for tokens in tokens_list:
        x = torch.randn(tokens, hidden, device=device, dtype=dt)
        res = torch.randn_like(x)
        w = torch.randn(hidden, device=device, dtype=dt)
        gate_up = torch.randn(tokens, 2 * inter, device=device, dtype=dt)
        qkv = torch.randn(tokens, (hq + 2 * hkv) * d, device=device, dtype=dt)
        q = qkv[:, : hq * d].view(tokens, hq, d)
        k = qkv[:, hq * d:(hq + hkv) * d].view(tokens, hkv, d)
        v = qkv[:, (hq + hkv) * d:].view(tokens, hkv, d)
        positions = torch.randint(0, 8192, (tokens,), device=device)
        angles = torch.rand(8192, d // 2, device=device) * 6.3  # a real rotation: values stay bounded
        cos_sin = torch.cat([angles.cos(), angles.sin()], dim=-1)
        pool = max(64, tokens // shape.page_size * 2)
        k_cache = torch.empty(pool, shape.page_size, hkv, d, device=device, dtype=dt)
        v_cache = torch.empty_like(k_cache)
        slots = torch.randperm(pool * shape.page_size, device=device)[:tokens]
        cases: list[tuple[str, int, Callable[[], Any], Callable[[], Any]]] = [
            ("rms_norm+residual", (4 * tokens * hidden + hidden) * esize,
             lambda x=x, res=res: rmsnorm.rms_norm_triton(x, w, 1e-5, res),
             lambda x=x, res=res: rmsnorm.rms_norm_ref(x, w, 1e-5, res)),
            ("silu_and_mul", 3 * tokens * inter * esize,
             lambda gate_up=gate_up: activation.silu_and_mul_triton(gate_up),
             lambda gate_up=gate_up: activation.silu_and_mul_ref(gate_up)),
            ("rotary (in place)", 2 * tokens * (hq + hkv) * d * esize + tokens * d * 4,
             lambda: rotary.apply_rotary_triton(q, k, positions, cos_sin),
             lambda: rotary.apply_rotary_ref(q, k, positions, cos_sin)),
            ("write_kv", 4 * tokens * hkv * d * esize + tokens * 8,
             lambda k_cache=k_cache, v_cache=v_cache: kv_write.write_kv_triton(k, v, k_cache, v_cache, slots),
             lambda k_cache=k_cache, v_cache=v_cache: kv_write.write_kv_ref(k, v, k_cache, v_cache, slots)),
            # Fused: q in place + k, v straight into the pages. "ref" here is the unfused Triton
            # pair (rotary then write_kv), i.e. what the model ran before: the speedup is the gain.
            ("rotary+write_kv fused", (2 * tokens * hq * d + 4 * tokens * hkv * d) * esize + tokens * (d * 4 + 16),
             lambda k_cache=k_cache, v_cache=v_cache: rope_kv_write.rope_and_write_kv_triton(
                 q, k, v, positions, cos_sin, k_cache, v_cache, slots),
             lambda k_cache=k_cache, v_cache=v_cache: (rotary.apply_rotary_triton(q, k, positions, cos_sin),
                                                        kv_write.write_kv_triton(k, v, k_cache, v_cache, slots))),
        ]
        for name, nbytes, fn, ref in cases:
            t = timer.ms(fn)
            t_ref = timer.ms(ref)
            rows.append(dict(kernel=name, tokens=tokens, bytes=nbytes, ms=t, tbs=nbytes / t / 1e9, ref_ms=t_ref,
                             speedup_vs_torch=t_ref / t))
            print(f"  {name:20s} T={tokens:5d} {t*1e3:8.1f}us {rows[-1]['tbs']:5.2f}TB/s "
                  f"({rows[-1]['tbs']/PEAK_BW_TBS:5.1%})  torch ref {t_ref*1e3:8.1f}us", flush=True)
        # The cases' lambdas hold their tensors as default arguments: drop them with the names.
        del cases, x, res, gate_up, qkv, k_cache, v_cache
        free(device)
    return rows


# ------------------------------------------------------------------------------------------------
# Tile sweep
# ------------------------------------------------------------------------------------------------

def bench_sweep(timer: Timer, shape: Shape, device: str, smoke: bool) -> dict[str, Any]:
    scale = shape.head_dim ** -0.5
    out: dict[str, Any] = {"decode": [], "decode_split": [], "prefill": []}
    group = shape.num_q_heads // shape.num_kv_heads
    # Decode, unsplit, at a batch that fills the GPU (B * kv_heads >= SMs).
    b = make_batch(shape, [1] * (4 if smoke else 64), [(60 if smoke else 4095)] * (4 if smoke else 64), device)
    args = (*b.args(), scale, 1, b.max_seq_len)
    nbytes = kv_bytes(b.seq_lens.tolist(), shape)
    for block_n in ([16, 32] if smoke else [32, 64, 128]):
        for stages in ([2] if smoke else [3, 4, 5, 6]):
            cfg = pa.AttnConfig(max(16, group), block_n, 4, stages)
            try:
                t = timer.ms(lambda args=args, cfg=cfg: pa.paged_attention_triton(*args, config=cfg))
            except Exception as e:  # out of shared memory etc.
                out["decode"].append(dict(config=asdict(cfg), error=type(e).__name__))
                continue
            out["decode"].append(dict(config=asdict(cfg), ms=t, tbs=nbytes / t / 1e9))
            print(f"  sweep decode B={b.seq_lens.numel()} ctx={b.max_seq_len} {cfg}: {t*1e3:8.1f}us "
                  f"{nbytes/t/1e9:5.2f}TB/s", flush=True)
    del b, args
    # Split decode at batch 1, long context.
    b = make_batch(shape, [1], [(200 if smoke else 8191)], device)
    args = (*b.args(), scale, 1, b.max_seq_len)
    nbytes = kv_bytes(b.seq_lens.tolist(), shape)
    splits = max(2, pa.num_kv_splits(1, b.max_seq_len, shape.num_kv_heads,
                                     num_sms(b.q.device) if device == "cuda" else 132))
    for block_n in ([16] if smoke else [32, 64, 128]):
        for stages in ([2] if smoke else [3, 5]):
            try:
                t = timer.ms(lambda args=args, block_n=block_n, stages=stages: pa.paged_attention_decode_split_triton(
                    *args, num_splits=splits, block_n=block_n, num_stages=stages))
            except Exception as e:
                out["decode_split"].append(dict(block_n=block_n, num_stages=stages, error=type(e).__name__))
                continue
            out["decode_split"].append(dict(block_n=block_n, num_stages=stages, splits=splits, ms=t,
                                            tbs=nbytes / t / 1e9))
            print(f"  sweep split B=1 ctx={b.max_seq_len} S={splits} block_n={block_n} stages={stages}: "
                  f"{t*1e3:8.1f}us {nbytes/t/1e9:5.2f}TB/s", flush=True)
    del b, args
    # Prefill: one 4096-token prompt.
    q_lens, ctx_lens = ([48], [0]) if smoke else ([4096], [0])
    b = make_batch(shape, q_lens, ctx_lens, device)
    args = (*b.args(), scale, b.max_query_len, b.max_seq_len)
    flops = causal_flops(q_lens, ctx_lens, shape)
    grid = [(16, 16, 4, 2)] if smoke else [
        (bm, bn, w, s) for bm in (64, 128) for bn in (32, 64, 128) for w in (4, 8) for s in (2, 3, 4)
        if not (bm == 64 and w == 8)]
    for bm, bn, w, s in grid:
        cfg = pa.AttnConfig(bm, bn, w, s)
        try:
            t = timer.ms(lambda args=args, cfg=cfg: pa.paged_attention_triton(*args, config=cfg))
        except Exception as e:
            out["prefill"].append(dict(config=asdict(cfg), error=type(e).__name__))
            continue
        out["prefill"].append(dict(config=asdict(cfg), ms=t, tflops=flops / t / 1e9))
        print(f"  sweep prefill {q_lens[0]} tokens {cfg}: {t*1e3:8.1f}us {flops/t/1e9:6.1f} TFLOP/s", flush=True)
    del b, args
    free(device)
    for key, metric in (("decode", "tbs"), ("decode_split", "tbs"), ("prefill", "tflops")):
        ok = [r for r in out[key] if metric in r]
        out[f"best_{key}"] = max(ok, key=lambda r: r[metric]) if ok else None
    out["defaults"] = {
        "decode": asdict(pa.attention_config(shape.head_dim, group, 1, shape.dtype)),
        "prefill": asdict(pa.attention_config(shape.head_dim, group, 4096, shape.dtype)),
        "split_block_n": pa.SPLIT_BLOCK_N, "decode_num_stages": pa.DECODE_NUM_STAGES,
    }
    return out


# ------------------------------------------------------------------------------------------------

def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_out = os.path.join(os.environ["OUT"], "kernels.json") if os.environ.get("OUT") else "kernels.json"
    parser.add_argument("--out", default=default_out, help="JSON results path (default: $OUT/kernels.json)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the tile-config sweep")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU with TRITON_INTERPRET=1 works)")
    parser.add_argument("--only", default="decode,prefill,elementwise,gemv,sweep",
                        help="comma-separated sections to run (decode,prefill,elementwise,gemv,sweep)")
    parser.add_argument("--peak-bw", type=float, default=PEAK_BW_TBS, help="HBM ceiling, TB/s")
    parser.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS, help="bf16 dense ceiling, TFLOP/s")
    args = parser.parse_args(argv)
    globals()["PEAK_BW_TBS"], globals()["PEAK_TFLOPS"] = args.peak_bw, args.peak_tflops

    if not HAS_TRITON:
        print("triton is not importable", file=sys.stderr)
        return 2
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        print("no CUDA device: run with --smoke under TRITON_INTERPRET=1 to check the script", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    timer = Timer(device)
    sms = num_sms(torch.device(device)) if device == "cuda" else 132
    import triton

    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke)",
        "num_sms": sms, "torch": torch.__version__, "triton": triton.__version__,
        "ceilings": {"hbm_tbs": PEAK_BW_TBS, "bf16_tflops": PEAK_TFLOPS},
        "heuristic": {"SPLIT_TARGET_WAVES": pa.SPLIT_TARGET_WAVES, "SPLIT_MIN_KEYS": pa.SPLIT_MIN_KEYS,
                      "SPLIT_MAX": pa.SPLIT_MAX},
        "timing": "triton.testing.do_bench median, L2 flushed per run",
    }
    if args.smoke:
        shapes = [Shape("smoke", 4, 2, 32, page_size=8, dtype=torch.float16)]
        batches, contexts, split_counts = [1, 3], [40, 100], [2, 4]
        side_shapes: list[Shape] = []
        tokens_list, hidden, inter = [3], 64, 48
    else:
        shapes = [LLAMA_8B]
        batches, contexts, split_counts = [1, 16, 64, 256], [512, 1024, 2048, 4096, 8192], [2, 4, 8, 16, 32]
        side_shapes = [LLAMA_1B, QWEN_7B]
        tokens_list, hidden, inter = [1, 64, 4096], 4096, 14336

    print(f"== {report['device']}  ({sms} SMs)  torch {torch.__version__}  triton {triton.__version__}")
    sections = set(args.only.split(","))
    decode_rows: list[dict[str, Any]] = []
    prefill_rows: list[dict[str, Any]] = []
    report["elementwise"] = []
    report["split_crossover"] = {}
    if "decode" in sections:
        print("== decode attention (achieved KV bandwidth)")
        decode_rows = bench_decode(timer, shapes[0], batches, contexts, split_counts, sms, device)
        for shape in side_shapes:  # crossover check on other head layouts, fewer points
            decode_rows += bench_decode(timer, shape, [1, 16, 64], [1024, 4096], split_counts, sms, device)
        report["decode"] = decode_rows
        report["split_crossover"] = split_crossover(decode_rows)

    if "prefill" in sections:
        print("== prefill attention (causal TFLOP/s)")
        prefill_rows = bench_prefill(timer, shapes[0], prefill_cases(args.smoke), device)
        for shape in side_shapes:
            prefill_rows += bench_prefill(timer, shape, prefill_cases(args.smoke)[:1], device)
        report["prefill"] = prefill_rows

    if "elementwise" in sections:
        print("== elementwise kernels (bytes moved / time)")
        report["elementwise"] = bench_elementwise(timer, shapes[0], tokens_list, hidden, inter, device)

    if "gemv" in sections:
        print("== gemv: Triton vs F.linear (cuBLAS) on the decode projections")
        report["gemv"] = gemv_section.bench_gemv(timer.ms, device, PEAK_BW_TBS, smoke=args.smoke)

    if not args.no_sweep and "sweep" in sections:
        print("== tile sweep")
        report["sweep"] = bench_sweep(timer, shapes[0], device, args.smoke)

    # ---- summary table ---------------------------------------------------------------------
    print("\n== summary")
    print(f"{'kernel':58s} {'figure':>14s} {'ceiling':>12s} {'ratio':>7s}")
    for r in decode_rows:
        label = f"decode {r['shape']} B={r['batch']} ctx={r['context']} (dispatch S={r['heuristic_splits']})"
        print(f"{label:58s} {r['heuristic_tbs']:10.2f}TB/s {PEAK_BW_TBS:8.1f}TB/s {r['heuristic_tbs']/PEAK_BW_TBS:7.1%}"
              f"   [unsplit {r['unsplit_tbs']:.2f}, best S={r['best_splits']} {r['best_tbs']:.2f} TB/s]")
    for r in prefill_rows:
        label = f"prefill {r['shape']} {r['case']}"
        print(f"{label[:58]:58s} {r['tflops']:8.1f}TFLOP/s {PEAK_TFLOPS:6.0f}TFLOP/s {r['tflops']/PEAK_TFLOPS:7.1%}")
    for r in report["elementwise"]:
        label = f"{r['kernel']} T={r['tokens']}"
        print(f"{label:58s} {r['tbs']:10.2f}TB/s {PEAK_BW_TBS:8.1f}TB/s {r['tbs']/PEAK_BW_TBS:7.1%}")
    if "gemv" in report:
        gemv_section.print_summary(report["gemv"], PEAK_BW_TBS)
    print("\n== split-KV crossover (shortest context where the best split beats unsplit by >5%)")
    for key, entry in report["split_crossover"].items():
        best = {c: v["best_splits"] for c, v in entry["contexts"].items()}
        print(f"  {key:22s} split wins from ctx {entry['split_wins_from_context']}  best S per ctx {best}  "
              f"heuristic agrees: {entry['heuristic_agrees']}")
    if "sweep" in report:
        sw = report["sweep"]
        split_best = sw["best_decode_split"]
        split_cfg = {k: split_best[k] for k in ("block_n", "num_stages")} if split_best else None
        print(f"\n== best configs: decode {sw['best_decode'] and sw['best_decode']['config']}, split {split_cfg}, "
              f"prefill {sw['best_prefill'] and sw['best_prefill']['config']}; defaults {sw['defaults']}")

    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1, default=str)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
