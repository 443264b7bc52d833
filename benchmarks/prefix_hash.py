"""Host time of the prefix cache's page keys (forty-second session): SHA-256 digests of (parent digest, extra
key, the page's ids) as cache/block_pool.py computes them, against the Python `hash()` of (parent, tokens,
extra key) they replaced (colliding keys served one prompt's KV to another: vLLM's CVE-2025-25183).

  python benchmarks/prefix_hash.py --tokens 512 8192 32768 --out benchmarks/results/s42/prefix_hash_cpu.json --record
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import append_result, command_line, device_name, write_json  # noqa: E402

from agentserve.cache.block_pool import compute_block_hashes  # noqa: E402


def builtin_keys(token_ids: Sequence[int], block_size: int) -> list[int]:
    """The keys before this session: Python's hash of (parent key, the page's ids, extra key)."""
    keys: list[int] = []
    parent = None
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash((parent, tuple(token_ids[start:start + block_size]), None))
        keys.append(parent)
    return keys


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[512, 8192, 32768])
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default=None)
    ap.add_argument("--record", action="store_true", help="append a line to benchmarks/RESULTS.md")
    args = ap.parse_args()
    rng = random.Random(0)
    rows = []
    print(f"{'prompt tokens':>14} {'pages':>6} {'sha256 ms':>10} {'hash() ms':>10} {'us/page sha256':>15}")
    for n in args.tokens:
        ids = [rng.randrange(128_256) for _ in range(n)]
        pages = n // args.block_size
        sha = median_ms(lambda: compute_block_hashes(ids, args.block_size, None, []), args.repeats)
        old = median_ms(lambda: builtin_keys(ids, args.block_size), args.repeats)
        rows.append({"tokens": n, "pages": pages, "sha256_ms": sha, "builtin_ms": old,
                     "sha256_us_per_page": sha * 1e3 / pages})
        print(f"{n:>14} {pages:>6} {sha:>10.3f} {old:>10.3f} {sha * 1e3 / pages:>15.2f}")
    command = command_line("prefix_hash.py", None)
    write_json({"command": command, "device": device_name(), "rows": rows}, args.out, "prefix_hash")
    figures = "; ".join(f"{r['tokens']:,} tokens {r['sha256_ms']:.2f} ms (hash() {r['builtin_ms']:.2f} ms)" for r in rows)
    if args.record:
        append_result("prefix-cache page keys, SHA-256 vs Python hash() (host, per prompt)", command, figures)


if __name__ == "__main__":
    main()
