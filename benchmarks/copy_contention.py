"""Does a swap's PCIe copy on its own stream stall a decode step? (issue #16's agent loop: the sessions'
decode-only steps that carry swaps take 27.9 ms on the step's stream against 12.8 ms for those that do not,
and the excess is in the forward part, not in the ops; twenty-third session, H100.)

A step here is what a decode step does with the copy engines: a few small host-to-device copies of its
inputs, a chain of GEMVs over ~1 GB of weights (device-bound, no PCIe), and one small device-to-host
copy of its sampled tokens. It is timed on its stream (events) alone, then with a 1 GiB swap copy issued
just before it on another stream, whole or in pieces of several sizes, in either direction. If the
copy engine serves the streams' copies in order, the step's small copies wait behind the swap's piece
in flight: its span grows by up to one piece's PCIe time (~20 ms for 1 GiB at ~50 GB/s). (The s24
session's second call also timed the swap in by a kernel reading the pinned memory: it slowed the step
as much; results/s24/call2_h100.)

  python benchmarks/copy_contention.py [--gib 1] [--out x.json]"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import device_name, write_json  # noqa: E402


class Step:
    """A decode step's copies and a device-bound body on the current stream."""

    def __init__(self, gemvs: int, copies_in: int, with_copies: bool = True) -> None:
        self.weight = torch.randn(4096, 14336, dtype=torch.bfloat16, device="cuda")  # 117 MB
        self.x = torch.randn(32, 4096, dtype=torch.bfloat16, device="cuda")
        self.gemvs = gemvs
        self.with_copies = with_copies
        self.host_in = [torch.randint(0, 100, (4096,), dtype=torch.int32).pin_memory() for _ in range(copies_in)]
        self.dev_in = [torch.empty(4096, dtype=torch.int32, device="cuda") for _ in range(copies_in)]
        self.host_out = torch.empty(32, dtype=torch.int64, pin_memory=True)

    def run(self) -> None:
        if self.with_copies:
            for dst, src in zip(self.dev_in, self.host_in):
                dst.copy_(src, non_blocking=True)
        y = self.x
        for _ in range(self.gemvs):
            y = (y @ self.weight)[:, :4096]
        if self.with_copies:
            self.host_out.copy_(y[:, 0].to(torch.int64), non_blocking=True)


def swap_copy(direction: str, host: torch.Tensor, dev: torch.Tensor, piece: int, stream: torch.cuda.Stream) -> None:
    """The whole buffer in `piece`-byte copies on `stream` (piece 0: one copy)."""
    n = host.numel()
    step = piece or n
    with torch.cuda.stream(stream):
        for i in range(0, n, step):
            if direction == "d2h":
                host[i:i + step].copy_(dev[i:i + step], non_blocking=True)
            else:
                dev[i:i + step].copy_(host[i:i + step], non_blocking=True)


def time_step(step: Step, load: Optional[tuple[str, int]], host: torch.Tensor, dev: torch.Tensor,
              side: torch.cuda.Stream, repeats: int) -> dict[str, float]:
    """The step's span on its stream (mean over repeats), each repeat after a fresh swap copy if `load`."""
    spans, copy_ms = [], []
    for _ in range(repeats):
        torch.cuda.synchronize()
        if load is not None:
            c0, c1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            c0.record(side)
            swap_copy(load[0], host, dev, load[1], side)
            c1.record(side)
        s0, s1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s0.record()
        step.run()
        s1.record()
        torch.cuda.synchronize()
        spans.append(s0.elapsed_time(s1))
        if load is not None:
            copy_ms.append(c0.elapsed_time(c1))
    spans.sort()
    out = {"step_ms_median": spans[len(spans) // 2], "step_ms_max": spans[-1]}
    if copy_ms:
        out["swap_copy_ms"] = sum(copy_ms) / len(copy_ms)
    return out


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--gemvs", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs CUDA")
        return 0
    n = int(args.gib * 2**30)
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    dev = torch.ones(n, dtype=torch.uint8, device="cuda")
    side = torch.cuda.Stream()
    steps = {"with_copies": Step(args.gemvs, 6), "no_copies": Step(args.gemvs, 6, with_copies=False)}
    for step in steps.values():
        step.run()
    loads: list[Optional[tuple[str, int]]] = [None]
    for direction in ("d2h", "h2d"):
        loads += [(direction, piece) for piece in (0, 64 << 20, 1 << 20)]
    rows: list[dict[str, Any]] = []
    print(f"{'step':12} {'swap copy':18} {'step median':>12} {'step max':>10} {'copy':>9}")
    for name, step in steps.items():
        for load in loads:
            r = time_step(step, load, host, dev, side, args.repeats)
            label = "none" if load is None else f"{load[0]} {'whole' if not load[1] else f'{load[1] >> 20} MiB'}"
            rows.append({"step": name, "load": label, **r})
            print(f"{name:12} {label:18} {r['step_ms_median']:10.2f}ms {r['step_ms_max']:8.2f}ms "
                  f"{r.get('swap_copy_ms', 0.0):7.2f}ms")
    write_json({"benchmark": "copy_contention", "device": device_name(), "bytes": n, "rows": rows}, args.out,
               "copy_contention")
    return 0


if __name__ == "__main__":
    sys.exit(main())
