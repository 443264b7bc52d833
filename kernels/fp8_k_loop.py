"""The FP8 GEMVs' K loop over groups of 8 weights: when it applies (grouped_k) and the tile's layout
(grouped_k_ptrs); the loop itself is gemv.fma_row_sums with GROUPED.

Why: in the plain fma loop a thread's 16-byte weight load holds 16 fp8 values but its 16-byte load of x
only 8 bf16; with more than one warp per program Triton loads x in its own layout and moves it into the
weights' through shared memory between barriers, every K chunk (the sm_90 PTX: benchmarks/gemv_loop_ptx.py;
4 barriers per iteration on every shipped multi-warp FP8 tile, none on the bf16 GEMV's). Here the tile is
[rows, BLOCK_K / 8, 8]: the innermost 8 weights are one 8-byte load and the matching 8 x values one
16-byte load, in layouts that line up, so the loop has no barrier (checked in the PTX for 1-8 warps) as
long as each thread has a group of its own (block_k >= 256 x warps). Same products, summed in another
order than the plain loop (fp32).

Off until the H200 measures it (benchmarks/NOTES.md, eighteenth session): AGENTSERVE_FP8_GEMV_GROUPED_K=1.
"""

from __future__ import annotations

import os

from ._triton_utils import tl, triton

FP8_GROUPED_K: bool = os.environ.get("AGENTSERVE_FP8_GEMV_GROUPED_K", "0") == "1"


def grouped_k(block_k: int, num_warps: int) -> bool:
    """Whether the FP8 GEMVs run the grouped K loop for a tile: whole groups of 8, and at least as many
    groups per K chunk as threads (block_k >= 256 x warps), else threads share a group's columns, x is
    replicated across them and converted again (the PTX: benchmarks/gemv_loop_ptx.py)."""
    return FP8_GROUPED_K and block_k % 8 == 0 and block_k >= 256 * num_warps


@triton.jit
def grouped_k_ptrs(w_rows, x_row, BLOCK_K: tl.constexpr):
    """The first K chunk of the grouped tile: weight pointers [rows, BLOCK_K / 8, 8] (`w_rows`: [rows]
    pointers to each row's first weight), x's [BLOCK_K / 8, 8] (`x_row`: x's row) and their K offsets."""
    offs_k = tl.arange(0, BLOCK_K // 8)[:, None] * 8 + tl.arange(0, 8)[None, :]
    w_ptrs = tl.expand_dims(tl.expand_dims(w_rows, 1), 2) + tl.expand_dims(offs_k, 0)
    return w_ptrs, x_row + offs_k, offs_k
