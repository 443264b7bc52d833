"""The FP8 GEMVs' K loop over groups of 8 weights: fma_row_sums with 8-byte weight loads, so that x needs
no layout conversion inside the loop.

Why: in the fma loop (kernels/gemv.py: fma_row_sums) a thread's 16-byte weight load holds 16 fp8 values
but its 16-byte load of x only 8 bf16; with more than one warp per program Triton loads x in its own
layout and moves it into the weights' through shared memory between barriers, every K chunk (the sm_90
PTX: benchmarks/gemv_loop_ptx.py; 4 barriers per iteration on every shipped multi-warp FP8 tile, none
on the bf16 GEMV's). Here the tile is [rows, BLOCK_K / 8, 8]: the innermost 8 weights are one 8-byte
load and the matching 8 x values one 16-byte load, in layouts that line up, so the loop has no barrier
(checked in the PTX for 1-8 warps) as long as each thread has a group of its own (block_k >= 256 x warps).
Same products, summed in another order than fma_row_sums (fp32).

Off until the H200 measures it (benchmarks/NOTES.md, eighteenth session): AGENTSERVE_FP8_GEMV_GROUPED_K=1.
"""

from __future__ import annotations

import os

from ._triton_utils import pdl_begin, tl, triton
from .k_chunk import load_k_chunk

FP8_GROUPED_K: bool = os.environ.get("AGENTSERVE_FP8_GEMV_GROUPED_K", "0") == "1"


def grouped_k(block_k: int, num_warps: int) -> bool:
    """Whether the FP8 GEMVs run fma_row_sums_grouped for a tile: whole groups of 8, and at least as many
    groups per K chunk as threads (block_k >= 256 x warps), else threads share a group's columns, x is
    replicated across them and converted again (the PTX: benchmarks/gemv_loop_ptx.py)."""
    return FP8_GROUPED_K and block_k % 8 == 0 and block_k >= 256 * num_warps


@triton.jit
def fma_row_sums_grouped(w_rows, x_row, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                         USE_PDL: tl.constexpr, W_FIRST: tl.constexpr = False):
    """fp32 sums over K of w[row, k] * x[k] for BLOCK_N rows (`w_rows`: [BLOCK_N] pointers to each row's
    first weight; `x_row`: x's row). fma_row_sums' contract otherwise: it holds the PDL wait (nothing
    before it may read an earlier kernel's output), and W_FIRST loads the first weight chunk before it."""
    offs_k = tl.arange(0, BLOCK_K // 8)[:, None] * 8 + tl.arange(0, 8)[None, :]
    w_ptrs = tl.expand_dims(tl.expand_dims(w_rows, 1), 2) + tl.expand_dims(offs_k, 0)
    x_ptrs = x_row + offs_k
    acc = tl.zeros([BLOCK_N, BLOCK_K // 8, 8], dtype=tl.float32)
    if W_FIRST:
        w_first = load_k_chunk(w_ptrs, offs_k, 0, K, EVEN_K, True)
    pdl_begin(USE_PDL)  # programmatic dependent launch: kernels/_triton_utils.py
    if W_FIRST:
        x = load_k_chunk(x_ptrs, offs_k, 0, K, EVEN_K, False)
        acc += w_first.to(tl.float32) * tl.expand_dims(x.to(tl.float32), 0)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    for k0 in range(BLOCK_K if W_FIRST else 0, K, BLOCK_K):
        w = load_k_chunk(w_ptrs, offs_k, k0, K, EVEN_K, True)
        x = load_k_chunk(x_ptrs, offs_k, k0, K, EVEN_K, False)
        acc += w.to(tl.float32) * tl.expand_dims(x.to(tl.float32), 0)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    return tl.sum(tl.sum(acc, 2), 1)
