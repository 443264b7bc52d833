"""The "gemv" section of benchmarks/kernel_suite.py: Triton GEMV vs F.linear (cuBLAS) on the decode
projections of Llama-3.1-8B (and Qwen2.5-7B's biased qkv), M = 1, 2, 4, 8.

For every (shape, M) it times F.linear, the dispatcher's heuristic Triton config, and a small
sweep of "fma" and "dot" configs, as achieved bandwidth = (weight + x + y bytes) / time against
the HBM ceiling. Then it adds the per-step totals at M=1 (32 layers x (qkv, o, gate_up, down) +
lm_head), which is what decides AGENTSERVE_GEMV's default: the predicted saving per decode step.

Run alone: `python benchmarks/kernel_suite.py --only gemv` (prints a table; JSON under "gemv")."""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from agentserve.kernels import gemv

# (name, K, N, bias, per-step count for the 8B M=1 total)
SHAPES = [
    ("qkv 4096->6144", 4096, 6144, False, 32),
    ("o 4096->4096", 4096, 4096, False, 32),
    ("gate_up 4096->28672", 4096, 28672, False, 32),
    ("down 14336->4096", 14336, 4096, False, 32),
    ("lm_head 4096->128256", 4096, 128256, False, 1),
    ("qwen2.5-7b qkv+bias 3584->4608", 3584, 4608, True, 0),
]
SMOKE_SHAPES = [("smoke 64->48", 64, 48, False, 2), ("smoke bias 96->40", 96, 40, True, 0)]
MS = [1, 2, 4, 8]


def sweep_configs(m: int, k: int, smoke: bool) -> list[gemv.GemvConfig]:
    if smoke:
        return [gemv.GemvConfig("fma", 16, 32, 4, 1), gemv.GemvConfig("dot", 16, 32, 4, 2)]
    cfgs = []
    for bn in (2, 4, 8, 16, 32):
        for elems in (2048, 4096, 8192):
            bk = elems // bn
            if 64 <= bk <= k and k % bk == 0:
                cfgs.append(gemv.GemvConfig("fma", bn, bk, 8 if elems == 8192 else 4, 1))
    for bn in (16, 32, 64):
        for bk in (128, 256):
            for stages in (3, 4, 6):
                if bn * bk * 2 * stages + 16 * bk * 2 * stages <= 200_000:
                    cfgs.append(gemv.GemvConfig("dot", bn, bk, 4, stages))
    return cfgs


def bench_gemv(ms_fn: Callable[[Callable[[], Any]], float], device: str, peak_tbs: float,
               smoke: bool = False) -> dict[str, Any]:
    dtype = torch.float16 if smoke else torch.bfloat16
    rows: list[dict[str, Any]] = []
    for name, k, n, bias, _ in (SMOKE_SHAPES if smoke else SHAPES):
        w = torch.randn(n, k, device=device, dtype=dtype) / k ** 0.5
        b = torch.randn(n, device=device, dtype=dtype) if bias else None
        for m in MS:
            x = torch.randn(m, k, device=device, dtype=dtype)
            nbytes = (n * k + m * k + m * n + (n if bias else 0)) * w.element_size()
            ref = F.linear(x, w, b)
            heur = gemv.gemv_config(m, n, k)
            got = gemv.gemv_triton(x, w, b)
            err = (got.float() - ref.float()).abs().max().item()
            t_torch = ms_fn(lambda x=x, w=w, b=b: F.linear(x, w, b))
            t_heur = ms_fn(lambda x=x, w=w, b=b: gemv.gemv_triton(x, w, b))
            best: dict[str, Any] = {"fma": None, "dot": None}
            for cfg in sweep_configs(m, k, smoke) if (m in (1, 4) or smoke) else []:
                try:
                    t = ms_fn(lambda cfg=cfg, x=x, w=w, b=b: gemv.gemv_triton(x, w, b, config=cfg))
                except Exception as e:  # out of shared memory / registers
                    print(f"    {cfg}: {type(e).__name__}", flush=True)
                    continue
                if best[cfg.kind] is None or t < best[cfg.kind]["ms"]:
                    best[cfg.kind] = dict(config=cfg.__dict__, ms=t, tbs=nbytes / t / 1e9)
            row = dict(shape=name, k=k, n=n, m=m, bias=bias, bytes=nbytes, max_abs_err=err,
                       torch_ms=t_torch, torch_tbs=nbytes / t_torch / 1e9,
                       triton_ms=t_heur, triton_tbs=nbytes / t_heur / 1e9, heuristic=heur.__dict__,
                       speedup=t_torch / t_heur, best_fma=best["fma"], best_dot=best["dot"])
            rows.append(row)
            sweep = " ".join(f"best {kind} {v['tbs']:.2f}TB/s {v['config']['block_n']}x{v['config']['block_k']}"
                             f"/w{v['config']['num_warps']}/s{v['config']['num_stages']}"
                             for kind, v in best.items() if v)
            print(f"  gemv {name:32s} M={m}  cuBLAS {t_torch*1e3:7.1f}us {row['torch_tbs']:5.2f}TB/s | "
                  f"triton[{heur.kind} {heur.block_n}x{heur.block_k}] {t_heur*1e3:7.1f}us "
                  f"{row['triton_tbs']:5.2f}TB/s ({row['triton_tbs']/peak_tbs:5.1%}) x{row['speedup']:.2f} "
                  f"err {err:.1e} {sweep}", flush=True)
            del x
        del w, b
        if device == "cuda":
            torch.cuda.empty_cache()
    return dict(rows=rows, step=step_totals(rows, smoke))


def step_totals(rows: list[dict[str, Any]], smoke: bool) -> dict[str, Any]:
    """Per-step linear-layer GPU time at each M: sum over the model's projections (count per step)."""
    counts = {name: c for name, _, _, _, c in (SMOKE_SHAPES if smoke else SHAPES)}
    out: dict[str, Any] = {}
    for m in MS:
        sel = [r for r in rows if r["m"] == m and counts[r["shape"]]]

        def best_of(r: dict[str, Any]) -> float:
            cands = [r["triton_ms"]] + [r[b]["ms"] for b in ("best_fma", "best_dot") if r[b]]
            return min(cands)

        torch_ms = sum(counts[r["shape"]] * r["torch_ms"] for r in sel)
        triton_ms = sum(counts[r["shape"]] * r["triton_ms"] for r in sel)
        best_ms = sum(counts[r["shape"]] * min(best_of(r), r["torch_ms"]) for r in sel)
        out[str(m)] = dict(torch_ms=torch_ms, triton_heuristic_ms=triton_ms, best_mix_ms=best_ms,
                           saving_heuristic_ms=torch_ms - triton_ms, saving_best_ms=torch_ms - best_ms)
    return out


def print_summary(result: dict[str, Any], peak_tbs: float) -> None:
    print("\n== gemv (bf16, bytes moved / time; decide AGENTSERVE_GEMV from 'step' lines)")
    for r in result["rows"]:
        label = f"gemv {r['shape']} M={r['m']}"
        print(f"{label:46s} triton {r['triton_tbs']:5.2f}TB/s ({r['triton_tbs']/peak_tbs:5.1%})  "
              f"cuBLAS {r['torch_tbs']:5.2f}TB/s  x{r['speedup']:.2f}")
    for m, s in result["step"].items():
        print(f"gemv step M={m}: linear layers per decode step  cuBLAS {s['torch_ms']:.3f} ms | triton heuristic "
              f"{s['triton_heuristic_ms']:.3f} ms (saves {s['saving_heuristic_ms']:+.3f}) | best mix "
              f"{s['best_mix_ms']:.3f} ms (saves {s['saving_best_ms']:+.3f})")
