"""The "sweep" section of benchmarks/kernel_suite.py: the attention tile configs around the defaults
(decode BLOCK_N x num_stages, split-KV decode BLOCK_N x num_stages, prefill BLOCK_M x BLOCK_N x
warps x stages), the best of each, and the defaults the kernels use, to compare."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from kernel_bench import Shape, Timer, causal_flops, free, kv_bytes, make_batch

from agentserve.kernels import paged_attention as pa
from agentserve.kernels._triton_utils import num_sms


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
        "split_block_n": pa.decode_tile(shape.head_dim)[0], "decode_num_stages": pa.decode_tile(shape.head_dim)[1],
    }
    return out


def print_best(sweep: dict[str, Any]) -> None:
    split_best = sweep["best_decode_split"]
    split_cfg = {k: split_best[k] for k in ("block_n", "num_stages")} if split_best else None
    print(f"\n== best configs: decode {sweep['best_decode'] and sweep['best_decode']['config']}, split {split_cfg}, "
          f"prefill {sweep['best_prefill'] and sweep['best_prefill']['config']}; defaults {sweep['defaults']}")
