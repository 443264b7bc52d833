"""Tiles of the FP8 GEMV (kernels/fp8_linear.py) and its gate_up + SiLU twin (kernels/gemv_silu.py): measured
per (device, kernel, N, K, M) where benchmarks/fp8_gemv_rows.py has swept them, a heuristic elsewhere.

The best tile depends on the shape and on M in ways one rule did not capture (vLLM ships its tuned Triton
configs the same way, as JSON per device). On the H200 (sweeps of 2026-12-04) the winners share a pattern,
which is the heuristic: tiles of ~8 KB of e4m3 weights (rows x BLOCK_K = 8,192) with the fewest rows
(4 to 32) that keep the grid, M programs per weight block, at <= 4 programs per SM. Fewer, larger tiles
leave SMs idle on the draft-sized projections; more programs double the waves at M = 2 (the FP8
Llama-3.2-1B draft's gate_up + SiLU took 22.1 us per layer at M = 2 with its 13.4 us M = 1 tile).

Tables: configs/fp8_gemv_<device name>.json beside this file (written by `fp8_gemv_rows.py
--write-tiles`); AGENTSERVE_FP8_GEMV_TILES=path reads another file instead (the sweep's own output, for
the engine A/B in the same run).
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path
from typing import Optional

import torch

from ._triton_utils import cdiv, next_pow2
from .gemv import GemvConfig, gemv_config

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
TILE_BYTES = 8192          # e4m3 weights per program's tile
PROGRAMS_PER_SM = 4        # the grid the heuristic keeps to
# Wide projections (many blocks whatever the rows) want small tiles, not ever larger ones: at the 8B's
# gate_up (28,672 rows) the sweep's 128 x 64 took 62.7 us against 33.3 for 32 x 256 and 31.9 for 16 x 256.
# The heuristic stops at 32 rows, which covers the lm_head (128,256 rows) too.
MAX_ROWS = 32
KERNELS = ("gemv", "gemv_silu")
INT_FIELDS = ("n", "k", "m", "block_n", "block_k", "num_warps")


def table_path(device_name: str) -> Path:
    """The shipped table's file for a device (its name with every run of non-alphanumerics as '_')."""
    return CONFIG_DIR / f"fp8_gemv_{re.sub(r'[^A-Za-z0-9]+', '_', device_name).strip('_')}.json"


@functools.lru_cache(maxsize=None)
def _table(device_name: str) -> dict[tuple[str, int, int, int], GemvConfig]:
    override = os.environ.get("AGENTSERVE_FP8_GEMV_TILES")
    path = Path(override) if override else table_path(device_name)
    if not path.exists():
        if override:
            raise FileNotFoundError(f"AGENTSERVE_FP8_GEMV_TILES={override}: no such file")
        return {}
    table: dict[tuple[str, int, int, int], GemvConfig] = {}
    try:
        for e in json.loads(path.read_text())["tiles"]:
            if e["kernel"] not in KERNELS or not all(isinstance(e[f], int) and e[f] > 0 for f in INT_FIELDS):
                raise ValueError(f"entry {e}")
            table[(e["kernel"], e["n"], e["k"], e["m"])] = GemvConfig("fma", e["block_n"], e["block_k"],
                                                                      num_warps=e["num_warps"], num_stages=1)
    except (ValueError, KeyError, TypeError) as err:  # JSONDecodeError is a ValueError
        raise ValueError(f"FP8 GEMV tile table {path}: {err} (each entry needs kernel in {KERNELS} and positive "
                         f"ints {', '.join(INT_FIELDS)}; benchmarks/fp8_gemv_rows.py "
                         "--write-tiles writes one)") from err
    return table


@functools.lru_cache(maxsize=None)
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def device_name_of(device: torch.device) -> Optional[str]:
    """A CUDA device's name (cached, no sync); None elsewhere (no table applies)."""
    if device.type != "cuda":
        return None
    return _device_name(device.index if device.index is not None else torch.cuda.current_device())


def heuristic_tile(n: int, k: int, sms: int, m: int) -> GemvConfig:
    """~TILE_BYTES of weights per program, rows doubled from 4 until M x blocks <= PROGRAMS_PER_SM x sms.
    K that the tile's K chunk does not divide falls back to the 16-bit GEMV's heuristic."""
    rows = 4
    while rows < MAX_ROWS and m * cdiv(n, rows) > PROGRAMS_PER_SM * sms:
        rows *= 2
    block_k = min(TILE_BYTES // rows, next_pow2(k))
    if k % block_k:
        return gemv_config(1, n, k, sms)
    # 16-row tiles ran faster at 8 warps in 5 of the sweep's 6 shapes (8B qkv 9.4 vs 10.6 us), the others
    # at 4 (8 rows: 8B o 6.5 vs 6.8; 32 rows: 8B gate_up 33.3 vs 38.6).
    return GemvConfig("fma", rows, block_k, num_warps=8 if rows == 16 else 4, num_stages=1)


def fp8_gemv_config(n: int, k: int, sms: int = 132, m: int = 1, *, kernel: str = "gemv",
                    device_name: Optional[str] = None) -> GemvConfig:
    """The tile for `kernel` ("gemv", or "gemv_silu": the gate_up + SiLU twin) over an [n, k] e4m3 weight
    at M rows: the named device's table entry if it has one, else the heuristic."""
    if kernel not in KERNELS:
        raise ValueError(f"fp8 gemv tiles: unknown kernel {kernel!r}")
    if device_name is not None:
        tile = _table(device_name).get((kernel, n, k, m))
        if tile is not None:
            return tile
    return heuristic_tile(n, k, sms, m)
