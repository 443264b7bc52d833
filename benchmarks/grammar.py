"""Grammar backends on real-world JSON schemas: coverage, compile time, per-token mask time, validity.

For each backend and each schema of the sample (shared/data/schemas/sample.jsonl):
  - compile it under a per-schema time limit (in a worker process that is killed and restarted
    on a time-out, so a hung compile never blocks the run); a time-out counts as not covered;
  - drive `--walks` random walks through the compiled grammar (uniformly random allowed tokens;
    EOS taken with probability 1/2 once accepting) and time fill_bitmask + accept_token per token;
  - decode each finished walk, json.loads it and validate it with jsonschema.

Prints a table and writes JSON (`--out`). The vocabulary comes from `--tokenizer` (a HF tokenizer
directory), by default a tiny model's (agentserve.testing.tiny) or the locally trained one.

    python benchmarks/grammar.py --out grammar.json
    python benchmarks/grammar.py --backends llguidance,outlines --limit 50 --timeout 5

TODO(engine integration): the per-step overhead part — decode steps at batch 1 and 64 with and
without grammar masks (build bitmask for all constrained rows, copy to device, apply kernel)
against unconstrained decoding, on the CPU tiny model and on an H100 with a dummy 8B /
128k-vocabulary model — belongs in a function `bench_step_overhead(engine_config)` here once
the engine can run constrained requests; nothing is measured for it yet.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

DEFAULT_SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "schemas" / "sample.jsonl"
if not DEFAULT_SAMPLE.exists():
    DEFAULT_SAMPLE = Path("/work/shared/data/schemas/sample.jsonl")
# The schema worker (compile + random walks + validation) lives with the grammar tests.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def _pct(values: list[float], q: float) -> Optional[float]:
    if not values:
        return None
    values = sorted(values)
    k = min(len(values) - 1, max(0, int(round(q * (len(values) - 1)))))
    return values[k]


def bench_compile(schemas: list[dict], backend: str, *, tokenizer_dir: Optional[str], timeout: float,
                  walks: int, max_tokens: int, walk_timeout: float, verbose: bool) -> dict:
    from helpers.grammar_walks import SchemaWorker, default_tokenizer_dir

    worker = SchemaWorker(backend, tokenizer_dir or default_tokenizer_dir(), walks=walks, max_tokens=max_tokens,
                          start_method="fork")
    worker.start()
    per_schema = []
    t_start = time.perf_counter()
    try:
        for i, row in enumerate(schemas):
            res = worker.run(i, row["schema"], timeout, walk_timeout)
            res["id"] = row["id"]
            res["subset"] = row["subset"]
            per_schema.append(res)
            if verbose:
                print(f"  [{backend}] {i + 1}/{len(schemas)} {row['id']}: {res['status']}"
                      + (f" {res['compile_s'] * 1e3:.1f} ms" if res.get("compile_s") else "")
                      + (f" {res.get('error', '')[:100]}" if res["status"] == "error" else ""),
                      file=sys.stderr, flush=True)
    finally:
        worker.close()
    compiled = [r for r in per_schema if r["status"] == "compiled"]
    times = [r["compile_s"] for r in compiled]
    steps = [u for r in compiled for u in r.get("step_us", [])]
    walk_stats: dict[str, int] = {}
    for r in compiled:
        for w in r.get("walks", []):
            walk_stats[w["status"]] = walk_stats.get(w["status"], 0) + 1
    bad_status = ("invalid", "invalid_json", "walk_error")
    invalid = [(r["id"], w.get("detail", "")) for r in compiled for w in r.get("walks", [])
               if w["status"] in bad_status]
    # compiled and no walk produced an invalid output: what the backend really enforces
    valid_covered = sum(1 for r in compiled if not any(w["status"] in bad_status for w in r.get("walks", [])))
    by_subset: dict[str, list[int]] = {}
    for r in per_schema:
        s = by_subset.setdefault(r["subset"], [0, 0])
        s[1] += 1
        s[0] += r["status"] == "compiled"
    return {
        "backend": backend,
        "vocab": worker.vocab,
        "schemas": len(schemas),
        "compiled": len(compiled),
        "errors": sum(r["status"] == "error" for r in per_schema),
        "timeouts": sum(r["status"] == "timeout" for r in per_schema),
        "coverage": len(compiled) / max(1, len(schemas)),
        "valid_covered": valid_covered,
        "schemas_with_invalid_outputs": len(compiled) - valid_covered,
        "coverage_by_subset": {k: f"{v[0]}/{v[1]}" for k, v in sorted(by_subset.items())},
        "compile_ms": {"p50": _ms(_pct(times, 0.5)), "p95": _ms(_pct(times, 0.95)), "max": _ms(max(times) if times else None)},
        "mask_us_per_token": {"p50": _pct(steps, 0.5), "p95": _pct(steps, 0.95),
                              "mean": statistics.fmean(steps) if steps else None, "tokens": len(steps)},
        "walks": walk_stats,
        "invalid_examples": invalid[:20],
        "wall_s": time.perf_counter() - t_start,
        "per_schema": per_schema,
    }


def _ms(s: Optional[float]) -> Optional[float]:
    return None if s is None else s * 1e3


def _fmt(v: Optional[float], nd: int = 1) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def print_table(results: list[dict], timeouts: dict[str, float]) -> None:
    print(f"{'backend':<11} {'coverage':>12} {'valid cov.':>11} {'err':>4} {'t/o':>4} {'limit':>6} {'compile p50':>12} "
          f"{'p95':>9} {'max':>9} {'mask us/tok p50':>16} {'p95':>7} {'walks valid/cap/invalid':>24}")
    for r in results:
        w = r["walks"]
        bad = w.get("invalid", 0) + w.get("invalid_json", 0) + w.get("walk_error", 0)
        print(f"{r['backend']:<11} {r['compiled']:>5}/{r['schemas']:<3} {100 * r['coverage']:>3.0f}% "
              f"{r['valid_covered']:>7}/{r['schemas']:<3} {r['errors']:>4} "
              f"{r['timeouts']:>4} {timeouts[r['backend']]:>5.0f}s {_fmt(r['compile_ms']['p50']):>9} ms "
              f"{_fmt(r['compile_ms']['p95']):>9} {_fmt(r['compile_ms']['max']):>9} "
              f"{_fmt(r['mask_us_per_token']['p50']):>16} {_fmt(r['mask_us_per_token']['p95']):>7} "
              f"{w.get('valid', 0):>12}/{w.get('cap', 0)}/{bad}")
    print("coverage by subset:")
    for r in results:
        print(f"  {r['backend']:<11} " + "  ".join(f"{k} {v}" for k, v in r["coverage_by_subset"].items()))


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--schemas", default=str(DEFAULT_SAMPLE))
    ap.add_argument("--backends", default="llguidance,xgrammar,outlines")
    ap.add_argument("--tokenizer", default=None, help="HF tokenizer dir (default: a tiny model's)")
    ap.add_argument("--timeout", type=float, default=10.0, help="per-schema compile limit, seconds")
    ap.add_argument("--outlines-timeout", type=float, default=None,
                    help="per-schema compile limit for outlines (default: --timeout)")
    ap.add_argument("--walks", type=int, default=2, help="random walks per compiled schema")
    ap.add_argument("--max-tokens", type=int, default=1000, help="cap per walk")
    ap.add_argument("--walk-timeout", type=float, default=60.0)
    ap.add_argument("--limit", type=int, default=0, help="only the first N schemas (spread over subsets)")
    ap.add_argument("--out", default=None, help="write JSON results here")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)

    rows = [json.loads(line) for line in open(args.schemas) if line.strip()]
    if args.limit:
        step = max(1, len(rows) // args.limit)
        rows = rows[::step][: args.limit]
    timeouts = {b: args.timeout for b in args.backends.split(",")}
    if args.outlines_timeout is not None and "outlines" in timeouts:
        timeouts["outlines"] = args.outlines_timeout
    results = []
    for b in args.backends.split(","):
        t0 = time.perf_counter()
        r = bench_compile(rows, b, tokenizer_dir=args.tokenizer, timeout=timeouts[b], walks=args.walks,
                          max_tokens=args.max_tokens, walk_timeout=args.walk_timeout, verbose=args.verbose)
        print(f"{b}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        results.append(r)
    print_table(results, timeouts)
    for r in results:
        if r["invalid_examples"]:
            print(f"{r['backend']}: invalid outputs (first {len(r['invalid_examples'])}):")
            for sid, detail in r["invalid_examples"][:5]:
                print(f"   {sid}: {detail[:160]}")
    if args.out:
        meta = {"schemas_file": args.schemas, "tokenizer": args.tokenizer or "default tiny",
                "timeouts_s": timeouts, "walks": args.walks, "max_tokens": args.max_tokens,
                "cpu_count": os.cpu_count()}
        Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
