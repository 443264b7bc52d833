"""Host <-> device copy rates over pinned memory (what a session's swap out / swap in moves over PCIe):
one direction at a time and both at once on two streams, for a 1 GiB buffer.

  python benchmarks/pcie.py [--gib 1] [--out x.json]"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import device_name, write_json  # noqa: E402


def rate_gb_s(nbytes: int, copies: list[tuple[torch.Tensor, torch.Tensor, torch.cuda.Stream]], repeats: int) -> float:
    """Bytes per second over all `copies` (dst, src, stream), each issued `repeats` times."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        for dst, src, stream in copies:
            with torch.cuda.stream(stream):
                dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    return nbytes * len(copies) * repeats / (time.perf_counter() - t0) / 1e9


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs CUDA")
        return 0
    n = int(args.gib * 2**30)
    host_in = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    host_out = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    dev_in, dev_out = torch.empty(n, dtype=torch.uint8, device="cuda"), torch.ones(n, dtype=torch.uint8, device="cuda")
    s_in, s_out = torch.cuda.Stream(), torch.cuda.Stream()
    rate_gb_s(n, [(dev_in, host_in, s_in)], 1)  # warm-up
    h2d = rate_gb_s(n, [(dev_in, host_in, s_in)], args.repeats)
    d2h = rate_gb_s(n, [(host_out, dev_out, s_out)], args.repeats)
    both = rate_gb_s(n, [(dev_in, host_in, s_in), (host_out, dev_out, s_out)], args.repeats)
    result = {"benchmark": "pcie", "device": device_name(), "bytes": n, "h2d_gb_s": h2d, "d2h_gb_s": d2h,
              "both_directions_gb_s": both}
    print(f"pinned copies of {args.gib:g} GiB: host->device {h2d:.1f} GB/s, device->host {d2h:.1f} GB/s, "
          f"both at once {both:.1f} GB/s in all")
    write_json(result, args.out, "pcie")
    return 0


if __name__ == "__main__":
    sys.exit(main())
