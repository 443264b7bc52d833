"""How llguidance's parallel mask fill scales with threads on this host (diagnostic for issue #16's
grammar_step figure: 64 rows took 3.6-4.1 ms on the H200's 16-core host, 3.3 ms on a 2-core CPU).

No model and no engine: grammar_step's synthetic 128k tokenizer and JSON schema, B matchers each
advanced by a different random walk of valid tokens (mid-output states, as in a decode batch), then
`fill_next_token_bitmask_par` timed with LLExecutor(num_threads=n) for several n, matchers made by
deep-copying one compiled template (what the engine does) vs each compiled on its own.

  python benchmarks/grammar_fill.py --batch 64 --threads 1,2,4,8,12,16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import device_name, write_json  # noqa: E402
from grammar_step import SCHEMA, synthetic_tokenizer  # noqa: E402

from agentserve.grammar.interface import bitmask_to_ids  # noqa: E402

import llguidance  # noqa: E402
import llguidance.hf  # noqa: E402
import llguidance.torch as llg_torch  # noqa: E402


def advanced_matchers(tokenizer: Any, grammar: str, batch: int, steps: int, shared: bool,
                      seed: int) -> list[Any]:
    """`batch` matchers, each after `steps` tokens drawn uniformly from its allowed set."""
    rng = np.random.default_rng(seed)
    template = llguidance.LLMatcher(tokenizer, grammar)
    mask = llg_torch.allocate_token_bitmask(1, tokenizer.vocab_size)
    out = []
    for _ in range(batch):
        m = template.deep_copy() if shared else llguidance.LLMatcher(tokenizer, grammar)
        for _ in range(steps):
            llg_torch.fill_next_token_bitmask(m, mask, 0)
            allowed = [t for t in bitmask_to_ids(mask[0], tokenizer.vocab_size) if t != tokenizer.eos_token]
            if len(allowed) == 0 or m.is_stopped():
                break
            m.consume_token(int(rng.choice(allowed)))
        out.append(m)
    return out


def time_fill(executor: Any, base: list[Any], vocab: int, repeats: int, seed: int) -> float:
    """Median ms of one parallel fill of every row. llguidance caches a state's mask (a second fill
    of the same state is ~10x cheaper), so between fills each matcher moves on by one allowed token
    (untimed): every timed fill computes new states, as a decode step does."""
    rng = np.random.default_rng(seed)
    matchers = [m.deep_copy() for m in base]
    mask = llg_torch.allocate_token_bitmask(len(matchers), vocab)
    times = []
    for _ in range(repeats):
        pairs = [(m, i) for i, m in enumerate(matchers)]
        start = time.perf_counter()
        llg_torch.fill_next_token_bitmask_par(executor, pairs, mask)
        times.append((time.perf_counter() - start) * 1000)
        for i, m in enumerate(matchers):
            allowed = bitmask_to_ids(mask[i], vocab)
            if m.is_stopped() or len(allowed) < 2:
                matchers[i] = base[i].deep_copy()
                continue
            m.consume_token(int(rng.choice(allowed)))
    return statistics.median(times)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--steps", type=int, default=24, help="tokens each matcher is advanced by first")
    ap.add_argument("--threads", default="1,2,4,8,12,16")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from transformers import AutoTokenizer
    tok_dir = synthetic_tokenizer(args.vocab, Path(tempfile.mkdtemp(prefix="agentserve-tok-")))
    tokenizer = llguidance.hf.from_tokenizer(AutoTokenizer.from_pretrained(str(tok_dir)))
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA))
    print(f"llguidance {llguidance.__version__ if hasattr(llguidance, '__version__') else '?'}, "
          f"{os.cpu_count()} CPUs, affinity {len(os.sched_getaffinity(0))}, torch threads {torch.get_num_threads()}")
    rows: list[dict[str, Any]] = []
    print(f"{'matchers':>10} {'threads':>8} {'fill ms':>8} {'per row us':>11}")
    for shared in (True, False):
        matchers = advanced_matchers(tokenizer, grammar, args.batch, args.steps, shared, seed=0)
        for n in [int(t) for t in args.threads.split(",")]:
            ms = time_fill(llguidance.LLExecutor(num_threads=n), matchers, args.vocab, args.repeats, seed=n)
            label = "shared" if shared else "separate"
            print(f"{label:>10} {n:>8} {ms:8.2f} {ms * 1000 / args.batch:11.1f}")
            rows.append({"matchers": label, "threads": n, "fill_ms": ms})
    serial = statistics.median(
        [_serial_ms(advanced_matchers(tokenizer, grammar, args.batch, args.steps, True, seed=0), args.vocab)
         for _ in range(3)])
    print(f"serial fill_next_token_bitmask, one thread: {serial:.2f} ms")
    write_json({"device": device_name(), "batch": args.batch, "rows": rows, "serial_ms": serial}, args.out,
               "grammar_fill")
    return 0


def _serial_ms(matchers: list[Any], vocab: int) -> float:
    mask = llg_torch.allocate_token_bitmask(len(matchers), vocab)
    start = time.perf_counter()
    for i, m in enumerate(matchers):
        llg_torch.fill_next_token_bitmask(m, mask, i)
    return (time.perf_counter() - start) * 1000


if __name__ == "__main__":
    sys.exit(main())
