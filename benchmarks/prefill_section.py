"""The "prefill" section of benchmarks/kernel_suite.py: prefill attention on one 8192-token prompt,
512-token chunks over 0/2048/7680-token prefixes, a batch of 16 fresh 512-token prompts and a
chunk mixed with decodes, as TFLOP/s against the bf16 dense ceiling. FLOPs are counted causally:
query at position p costs 4 * head_dim * (p + 1) per head (QK^T and PV), nothing for masked-out keys."""

from __future__ import annotations

from typing import Any, Optional

from kernel_bench import Shape, Timer, causal_flops, free, kv_bytes, make_batch

from agentserve.kernels import paged_attention as pa


def bench_prefill(timer: Timer, shape: Shape, cases: list[tuple[str, list[int], list[int]]],
                  device: str, peak_tflops: float, config: Optional[pa.AttnConfig] = None) -> list[dict[str, Any]]:
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
              f"({rows[-1]['tflops']/peak_tflops:5.1%} of {peak_tflops:.0f})", flush=True)
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


def print_summary(rows: list[dict[str, Any]], peak_tflops: float) -> None:
    for r in rows:
        label = f"prefill {r['shape']} {r['case']}"
        print(f"{label[:58]:58s} {r['tflops']:8.1f}TFLOP/s {peak_tflops:6.0f}TFLOP/s {r['tflops']/peak_tflops:7.1%}")
