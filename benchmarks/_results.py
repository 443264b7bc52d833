"""Appends a line to benchmarks/RESULTS.md: date, device, command, figures."""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any, Optional

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


def write_json(result: Any, out: Optional[str], name: str) -> Optional[Path]:
    """Writes the result to --out, else to $OUT/<name>.json when OUT is set (the GPU machine)."""
    target = out or (os.path.join(os.environ["OUT"], f"{name}.json") if os.environ.get("OUT") else None)
    if not target:
        return None
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return path


def command_line(script: str, argv: Optional[list[str]]) -> str:
    """The command as RESULTS.md records it."""
    return " ".join([f"python benchmarks/{script}", *(argv or sys.argv[1:])])
