"""The "decode" section of benchmarks/kernel_suite.py: decode attention at batch x context, unsplit vs
split-KV (the heuristic's split count and the best of a sweep), as achieved bandwidth = K+V bytes
of every context / time, against the HBM ceiling; and the split-KV crossover: per batch, the
shortest context at which splitting wins by > 5%, and whether `use_split_kv` agrees."""

from __future__ import annotations

from typing import Any

from kernel_bench import Shape, Timer, free, kv_bytes, make_batch

from agentserve.kernels import paged_attention as pa


def bench_decode(timer: Timer, shape: Shape, batches: list[int], contexts: list[int], split_counts: list[int],
                 sms: int, device: str, peak_tbs: float) -> list[dict[str, Any]]:
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
                  f"best S={r['best_splits']:2d} {r['best_tbs']:5.2f}TB/s ({r['best_tbs']/peak_tbs:5.1%} of peak)",
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


def print_summary(rows: list[dict[str, Any]], peak_tbs: float) -> None:
    for r in rows:
        label = f"decode {r['shape']} B={r['batch']} ctx={r['context']} (dispatch S={r['heuristic_splits']})"
        print(f"{label:58s} {r['heuristic_tbs']:10.2f}TB/s {peak_tbs:8.1f}TB/s {r['heuristic_tbs']/peak_tbs:7.1%}"
              f"   [unsplit {r['unsplit_tbs']:.2f}, best S={r['best_splits']} {r['best_tbs']:.2f} TB/s]")


def print_crossover(crossover: dict[str, Any]) -> None:
    print("\n== split-KV crossover (shortest context where the best split beats unsplit by >5%)")
    for key, entry in crossover.items():
        best = {c: v["best_splits"] for c, v in entry["contexts"].items()}
        print(f"  {key:22s} split wins from ctx {entry['split_wins_from_context']}  best S per ctx {best}  "
              f"heuristic agrees: {entry['heuristic_agrees']}")
