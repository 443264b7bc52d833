"""benchmarks/agent_loop_tail.py: the slowest loops' phases, from the agent loop's per-loop records."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from agent_loop_tail import describe, phases, tail_breakdown  # noqa: E402


def record(latency: float, queue: float, ttft: float, decode: float | None, swap_wait: float = 0.0,
           generated: int = 50) -> dict[str, float | None]:
    return {"latency_ms": latency, "queue_ms": queue, "ttft_ms": ttft, "decode_ms": decode,
            "swap_wait_ms": swap_wait, "generated": generated, "prefilled": 1000, "swapped_in": 0}


def test_a_loop_splits_into_its_phases() -> None:
    p = phases(record(latency=1000.0, queue=300.0, ttft=450.0, decode=520.0, swap_wait=100.0))
    assert (p["queue_ms"], p["to_first_ms"], p["decode_ms"], p["other_ms"]) == (300.0, 150.0, 520.0, 30.0)
    assert p["queue_ms"] + p["to_first_ms"] + p["decode_ms"] + p["other_ms"] == p["latency_ms"]
    # The responses mode has no server decode time: the rest of the latency after the first token.
    q = phases(record(latency=1000.0, queue=0.0, ttft=400.0, decode=None))
    assert (q["decode_ms"], q["other_ms"]) == (600.0, 0.0)


def test_the_tail_is_the_slowest_tenth() -> None:
    # 20 loops: 18 fast ones (queue 100 ms), 2 slow ones that waited 3 s in the queue.
    loops = [record(1000.0 + i, 100.0, 300.0, 680.0) for i in range(18)]
    loops += [record(4000.0, 3000.0, 3300.0, 680.0, swap_wait=2000.0) for _ in range(2)]
    b = tail_breakdown(loops)
    assert b["count"] == 2  # the ones at or above the 90th percentile
    assert b["tail"]["queue_ms"] == 3000.0 and b["tail"]["swap_wait_ms"] == 2000.0
    assert b["all"]["queue_ms"] == pytest.approx((18 * 100.0 + 2 * 3000.0) / 20)
    assert b["tail"]["decode_ms"] == b["all"]["decode_ms"] == 680.0
    line = describe(b)
    assert line.startswith("slowest 2 loops (>= p90)") and "queue 3000 (390)" in line


def test_no_loops_give_no_figures() -> None:
    b = tail_breakdown([])
    assert b["count"] == 0 and math.isnan(b["tail"]["latency_ms"])
