"""The machine's ceilings, measured where the benchmark runs, so every limit derived from them is
true on that machine (an H100 and an H200 differ by 40% in bandwidth):

  copy_bytes_s   device-to-device copy of a large buffer, read + write bytes / time (the rate at which
                 a decode step can stream the weights)
  matmul_flop_s  one square matmul in the model's dtype (8192^3 on a GPU), 2 n^3 / time

Medians of several timed repeats after a warm-up; CUDA events on a GPU, perf_counter on CPU. The CPU
path measures the same two things (smaller in smoke mode) so the benchmarks run end to end there.

KNOWN_DEVICES holds the figures measured on the GPUs the project benchmarks on, each naming where it
came from: `--ceilings table` uses them instead of measuring, and a measurement that fails (out of
device memory beside an engine's KV pool) falls back to them. Every Ceilings says which it is.

  python benchmarks/ceilings.py [--smoke] [--ceilings measure|table]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Optional

import torch

GPU_COPY_BYTES = 1 << 30       # 1 GiB per buffer: far beyond any L2, so the copy streams from HBM
GPU_MATMUL_N = 8192            # the size the issues quote (806 TFLOP/s on an H200)
CPU_COPY_BYTES = 256 << 20     # beyond the last-level cache of any CPU we run on
CPU_MATMUL_N = 2048
SMOKE_COPY_BYTES = 16 << 20    # smoke mode: the numbers only need to be finite and positive
SMOKE_MATMUL_N = 256
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
SOURCES = ("measure", "table")
MEASURED = "measured here"


@dataclass(frozen=True)
class KnownDevice:
    """A GPU's ceilings as measured on it once (the same copy and 8192^3 matmul as measure_ceilings)."""
    copy_bytes_s: float
    matmul_flop_s: float      # dense 16-bit (bf16; fp16 runs at the same tensor-core rate)
    source: str


# Keyed by torch.cuda.get_device_name exactly: an H100 PCIe or an H200 NVL has other ceilings.
KNOWN_DEVICES: dict[str, KnownDevice] = {
    "NVIDIA H200": KnownDevice(4.26e12, 806e12, "H200 141GB HBM3e, measured 2026-12-02 (shared/gpu/README.md)"),
    "NVIDIA H100 80GB HBM3": KnownDevice(3.0e12, 781e12, "H100 SXM 80GB HBM3, measured 2026-11-23 (issue #3)"),
}
TABLE_DTYPES = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Ceilings:
    device: str
    copy_bytes_s: float
    matmul_flop_s: float
    copy_buffer_bytes: int
    matmul_n: int
    matmul_dtype: str
    repeats: int
    source: str = MEASURED  # or the KNOWN_DEVICES entry the figures were taken from

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        # 3 significant digits: an H200's 4.26 TB/s and a loaded CPU's 0.00512 TB/s both stay readable.
        return (f"copy {self.copy_bytes_s / 1e12:.3g} TB/s (read+write, {self.copy_buffer_bytes >> 20} MiB), "
                f"{self.matmul_dtype} matmul {self.matmul_flop_s / 1e12:.3g} TFLOP/s ({self.matmul_n}^3), {self.source}")


def _median_seconds(fn: Callable[[], None], device: torch.device, repeats: int, inner: int) -> float:
    """Median over `repeats` samples of the time of `inner` back-to-back calls, divided by `inner`."""
    for _ in range(2):  # warm-up: allocator, cuBLAS heuristics, clocks
        fn()
    samples = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3 / inner)
    else:
        for _ in range(repeats):
            t = time.perf_counter()
            for _ in range(inner):
                fn()
            samples.append((time.perf_counter() - t) / inner)
    return statistics.median(samples)


def measure_copy_bytes_s(device: torch.device, nbytes: int, repeats: int) -> float:
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = _median_seconds(lambda: dst.copy_(src), device, repeats, inner=4)
    return 2.0 * nbytes / seconds  # every byte is read once and written once


def measure_matmul_flop_s(device: torch.device, n: int, dtype: torch.dtype, repeats: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    seconds = _median_seconds(lambda: torch.matmul(a, b, out=out), device, repeats, inner=4)
    return 2.0 * n ** 3 / seconds


def measure_ceilings(device: torch.device, dtype: torch.dtype, smoke: bool = False,
                     repeats: Optional[int] = None) -> Ceilings:
    """Both ceilings on `device`; matmuls in `dtype` (the model's: bf16 for the fast-path figures)."""
    if smoke:
        nbytes, n, reps = SMOKE_COPY_BYTES, SMOKE_MATMUL_N, repeats or 3
    elif device.type == "cuda":
        nbytes, n, reps = GPU_COPY_BYTES, GPU_MATMUL_N, repeats or 10
    else:
        nbytes, n, reps = CPU_COPY_BYTES, CPU_MATMUL_N, repeats or 5
    ceilings = Ceilings(device=device_label(device), copy_bytes_s=measure_copy_bytes_s(device, nbytes, reps),
                        matmul_flop_s=measure_matmul_flop_s(device, n, dtype, reps), copy_buffer_bytes=nbytes,
                        matmul_n=n, matmul_dtype=str(dtype).removeprefix("torch."), repeats=reps)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the 2 GiB of copy buffers go back before an engine sizes its KV pool
    return ceilings


def device_label(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def table_ceilings(device: torch.device, dtype: torch.dtype) -> Ceilings:
    """The KNOWN_DEVICES figures for `device`; LookupError when it has none for this device and dtype."""
    name = device_label(device)
    known = KNOWN_DEVICES.get(name)
    if known is None or dtype not in TABLE_DTYPES:
        raise LookupError(f"no table ceilings for {name} in {str(dtype).removeprefix('torch.')} (the table has "
                          f"{', '.join(KNOWN_DEVICES)} in {'/'.join(str(d).removeprefix('torch.') for d in TABLE_DTYPES)}); "
                          "measure them instead (--ceilings measure)")
    return Ceilings(device=name, copy_bytes_s=known.copy_bytes_s, matmul_flop_s=known.matmul_flop_s,
                    copy_buffer_bytes=GPU_COPY_BYTES, matmul_n=GPU_MATMUL_N,
                    matmul_dtype=str(dtype).removeprefix("torch."), repeats=0, source=f"table: {known.source}")


def device_ceilings(device: torch.device, dtype: torch.dtype, smoke: bool = False, source: str = "measure") -> Ceilings:
    """The ceilings every benchmark limit is derived from. `source` "measure": measured on `device` now,
    naming the table's figures beside them when the device is in it (a large gap means a busy or
    throttled GPU), and the table's figures when the measurement runs out of device memory; "table":
    the table's figures (LookupError for a device it does not know)."""
    if source not in SOURCES:
        raise ValueError(f"ceilings source {source!r}: use one of {', '.join(SOURCES)}")
    if source == "table":
        return table_ceilings(device, dtype)
    try:
        measured = measure_ceilings(device, dtype, smoke=smoke)
    except torch.cuda.OutOfMemoryError as e:
        table = table_ceilings(device, dtype)  # no entry: the LookupError says so, chained to the OOM
        torch.cuda.empty_cache()
        return replace(table, source=f"{table.source}; measuring ran out of memory ({str(e).splitlines()[0]})")
    known = KNOWN_DEVICES.get(measured.device) if not smoke and dtype in TABLE_DTYPES else None
    if known is None:
        return measured
    return replace(measured, source=f"{MEASURED} (table: {known.copy_bytes_s / 1e12:.3g} TB/s, "
                                    f"{known.matmul_flop_s / 1e12:.3g} TFLOP/s, {known.source})")


def add_ceilings_arg(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--ceilings", choices=SOURCES, default="measure",
                    help="measure the copy rate and matmul rate at start (default), or take them from the table "
                         "of known GPUs (benchmarks/ceilings.py KNOWN_DEVICES)")


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    ap.add_argument("--smoke", action="store_true", help="small buffers and matrices (CPU smoke runs)")
    add_ceilings_arg(ap)
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    print(device_ceilings(device, DTYPES[args.dtype], smoke=args.smoke, source=args.ceilings).describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
