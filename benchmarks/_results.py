"""Appends a line to benchmarks/RESULTS.md: date, device, command, figures."""

from __future__ import annotations

import datetime
import platform
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = ("# Benchmark results\n\nOne line per run: date | device | benchmark | command | figures.\n\n"
          "| date | device | benchmark | command | figures |\n|---|---|---|---|---|\n")


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def append_result(benchmark: str, command: str, figures: str) -> None:
    if not RESULTS.exists():
        RESULTS.write_text(HEADER)
    date = datetime.date.today().isoformat()
    with RESULTS.open("a") as f:
        f.write(f"| {date} | {device_name()} | {benchmark} | `{command}` | {figures} |\n")
