"""The "elementwise" section of benchmarks/kernel_suite.py: rms_norm(+residual), silu_and_mul, rotary and
write_kv bandwidth (the bytes each kernel must move / time) next to the torch reference's time, and
the fused rotary + KV write against rotary then write_kv."""

from __future__ import annotations

from typing import Any, Callable

import torch

from kernel_bench import Shape, Timer, free

from agentserve.kernels import activation, kv_write, rmsnorm, rope_kv_write, rotary


def bench_elementwise(timer: Timer, shape: Shape, tokens_list: list[int], hidden: int, inter: int,
                      device: str, peak_tbs: float) -> list[dict[str, Any]]:
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
                  f"({rows[-1]['tbs']/peak_tbs:5.1%})  torch ref {t_ref*1e3:8.1f}us", flush=True)
        # The cases' lambdas hold their tensors as default arguments: drop them with the names.
        del cases, x, res, gate_up, qkv, k_cache, v_cache
        free(device)
    return rows


def print_summary(rows: list[dict[str, Any]], peak_tbs: float) -> None:
    for r in rows:
        label = f"{r['kernel']} T={r['tokens']}"
        print(f"{label:58s} {r['tbs']:10.2f}TB/s {peak_tbs:8.1f}TB/s {r['tbs']/peak_tbs:7.1%}")
