"""The decode-batch GPU benchmark's command line (benchmarks/overlap.py): batch sizes and the rows' context
range, checked for CUDA."""

from __future__ import annotations

import argparse
from typing import Optional

import torch


def add_decode_rows_args(ap: argparse.ArgumentParser, batches: str, context: str) -> None:
    ap.add_argument("--batches", default=batches, help="comma-separated decode batch sizes")
    ap.add_argument("--context", default=context, help="rows' contexts, uniform in LO,HI")
    ap.add_argument("--out", default=None)


def parse_decode_rows_args(ap: argparse.ArgumentParser,
                           argv: Optional[list[str]]) -> Optional[tuple[argparse.Namespace, list[int], int, int]]:
    """(args, batch sizes, context low, context high), or None after saying so where there is no GPU."""
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs CUDA")
        return None
    lo, hi = (int(v) for v in args.context.split(","))
    return args, [int(v) for v in args.batches.split(",")], lo, hi
