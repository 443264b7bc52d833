"""The FP8 GEMVs' K loop with each thread's 16 weights split into two halves of 8, so that x needs no
layout conversion inside the loop and both loads stay 16 bytes wide.

Why: in the fma loop (kernels/gemv.py: fma_row_sums) a thread's 16-byte weight load holds 16 e4m3
values but its 16-byte load of x only 8 bf16, so on multi-warp tiles Triton loads x in its own layout
and moves it into the weights' through shared memory between 4 barriers per K chunk (the sm_90 PTX:
benchmarks/gemv_loop_ptx.py). Two earlier ways around it lost on the H200 (benchmarks/NOTES.md): groups
of 8 weights (8-byte weight loads, -6% one stream) and one-warp tiles (no sweep winner). Here the weight
tile keeps its 16-byte loads; in registers each thread's 16 weights split into w[16g .. 16g + 8) and
w[16g + 8 .. 16g + 16) (a reshape, a permute and tl.split, no data movement), each multiplied by an
x tile of [BLOCK_K / 16, 8] loaded as 16 bytes per thread, in the layout the split leaves. That layout
is the slice of the weights' only when every warp lies along K (BLOCK_K == 512 x warps), and then the
loop has no barrier and no shared-memory store (tests/test_kernels_compile_sm90.py checks the PTX).
Same products as fma_row_sums, summed in another fp32 order. Even K chunks only (no masks).

Off until the H200 measures it (benchmarks/NOTES.md, twenty-first session): AGENTSERVE_FP8_GEMV_HALVES=1.
"""

from __future__ import annotations

import os
from typing import Optional

from ._triton_utils import pdl_begin, tl, triton

FP8_GEMV_HALVES: bool = os.environ.get("AGENTSERVE_FP8_GEMV_HALVES", "0") == "1"
WARP_K = 512  # K per warp and chunk: 32 threads x 16 weights
MAX_WARPS = 8
MAX_ROWS = 16  # the accumulator holds 8 fp32 per row and thread: 128 registers at 16 rows


def halves_fit(block_n: int, block_k: int, num_warps: int, k: int) -> bool:
    """Whether the halves loop runs this tile: every warp along K, even chunks, 2 to MAX_ROWS rows (the
    gate_up + SiLU twin splits its rows into gate and up)."""
    return (block_k == WARP_K * num_warps and num_warps <= MAX_WARPS and k % block_k == 0
            and 2 <= block_n <= MAX_ROWS)


def halves_tile(block_n: int, block_k: int, k: int) -> Optional[tuple[int, int, int]]:
    """(rows, BLOCK_K, warps) for the halves loop carrying a plain tile's bytes per program (rows x BLOCK_K
    weights): its K chunk widened to >= 512 and to <= MAX_ROWS rows (rows shrunk to match), one warp per
    512 of it, the chunk halved until it divides K. None when no such tile fits K."""
    weights = block_n * block_k
    chunk = min(max(block_k, WARP_K, weights // MAX_ROWS), WARP_K * MAX_WARPS)
    while chunk >= WARP_K:
        rows = weights // chunk
        if k % chunk == 0 and 2 <= rows <= MAX_ROWS:
            return rows, chunk, chunk // WARP_K
        chunk //= 2
    return None


@triton.jit
def _halves_fma(acc, w, x_ptrs, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr):
    """acc [BLOCK_N, GROUPS, 8] += the products of a weight chunk w [BLOCK_N, 16 x GROUPS] and its x: each
    thread's 16 weights as two halves of 8, against x[16g + j] and x[16g + 8 + j] (x_ptrs: [GROUPS, 8])."""
    low, high = tl.split(tl.permute(tl.reshape(w.to(tl.float32), [BLOCK_N, GROUPS, 2, 8]), [0, 1, 3, 2]))
    acc += low * tl.load(x_ptrs).to(tl.float32)[None, :, :]
    acc += high * tl.load(x_ptrs + 8).to(tl.float32)[None, :, :]  # two fmas per weight, not a mul and an add
    return acc


@triton.jit
def fp8_row_sums_halves(w_ptrs, x_row, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr,
                        W_FIRST: tl.constexpr = False):
    """fp32 sums over K of w[row, k] * x[k] for BLOCK_N rows (`w_ptrs`: the [BLOCK_N, BLOCK_K] pointers of
    the first chunk; `x_row`: x's row). fma_row_sums' contract otherwise: it holds the PDL wait (nothing
    before it may read an earlier kernel's output), and W_FIRST loads the first weight chunk before it."""
    GROUPS: tl.constexpr = BLOCK_K // 16
    x_ptrs = x_row + tl.arange(0, GROUPS)[:, None] * 16 + tl.arange(0, 8)[None, :]
    acc = tl.zeros([BLOCK_N, GROUPS, 8], dtype=tl.float32)
    if W_FIRST:
        w_first = tl.load(w_ptrs)
    pdl_begin(USE_PDL)  # programmatic dependent launch: kernels/_triton_utils.py
    if W_FIRST:
        acc = _halves_fma(acc, w_first, x_ptrs, BLOCK_N, GROUPS)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    for _ in range(BLOCK_K if W_FIRST else 0, K, BLOCK_K):
        acc = _halves_fma(acc, tl.load(w_ptrs), x_ptrs, BLOCK_N, GROUPS)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    return tl.sum(tl.sum(acc, 2), 1)
