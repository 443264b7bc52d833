"""What the agent loop's slowest loops are made of (issue #16's p95 ratio): the loops at or above the 90th
percentile of latency against all loops, each split into its phases as the server timed them.

  queue_ms        the turn's request waiting to be scheduled (pages under pool pressure, the step budget)
  to_first_ms     scheduled -> first token: its prefill chunks (and a swapped session's copy back)
  decode_ms       first token -> done: its generated tokens, one per step shared with the whole batch
  other_ms        the client's latency less the server's time to first token and decode (RPC, detokenizing)
  swap_wait_ms    of queue_ms, waiting for free pages to swap the session back in

A tail dominated by queue_ms is admission (memory); by decode_ms, the step time while the batch is busy; by
to_first_ms, prefill steps. benchmarks/agent_loop.py adds it to every mode's summary as "tail"."""

from __future__ import annotations

import math
import statistics
from typing import Any

TAIL_QUANTILE = 0.9
PHASES = ("latency_ms", "queue_ms", "to_first_ms", "decode_ms", "other_ms", "swap_wait_ms", "generated", "prefilled",
          "swapped_in")


def phases(record: dict[str, Any]) -> dict[str, float]:
    """One loop's phases (ms) and sizes (tokens) from its agent_loop record."""
    decode = record["latency_ms"] - record["ttft_ms"] if record.get("decode_ms") is None else record["decode_ms"]
    return {"latency_ms": record["latency_ms"], "queue_ms": record["queue_ms"],
            "to_first_ms": max(0.0, record["ttft_ms"] - record["queue_ms"]), "decode_ms": decode,
            "other_ms": record["latency_ms"] - record["ttft_ms"] - decode,
            "swap_wait_ms": record.get("swap_wait_ms", 0.0), "generated": record["generated"],
            "prefilled": record["prefilled"], "swapped_in": record["swapped_in"]}


def means(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.fmean(r[k] for r in rows) if rows else math.nan for k in PHASES}


def tail_breakdown(loops: list[dict[str, Any]], quantile: float = TAIL_QUANTILE) -> dict[str, Any]:
    """Mean phases of the slowest (1 - quantile) of the loops, and of all loops."""
    if not loops:
        return {"quantile": quantile, "count": 0, "tail": means([]), "all": means([])}
    rows = [phases(r) for r in loops]
    slowest = max(1, round(len(rows) * (1 - quantile)))  # the slowest tenth at 0.9 (round: 20 x 0.1 is 2.0000000000000004)
    tail = sorted(rows, key=lambda r: r["latency_ms"], reverse=True)[:slowest]
    return {"quantile": quantile, "count": len(tail), "tail": means(tail), "all": means(rows)}


def describe(breakdown: dict[str, Any]) -> str:
    """One line: the tail's phases against all loops'."""
    t, a = breakdown["tail"], breakdown["all"]
    parts = [f"{k.removesuffix('_ms')} {t[k]:.0f} ({a[k]:.0f})" for k in PHASES if k.endswith("_ms")]
    sizes = [f"{k} {t[k]:.0f} ({a[k]:.0f})" for k in PHASES if not k.endswith("_ms")]
    return (f"slowest {breakdown['count']} loops (>= p{breakdown['quantile'] * 100:.0f}), ms and tokens, all loops in "
            f"(): " + ", ".join(parts + sizes))
