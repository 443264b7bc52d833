"""The slice test both LoRA expand kernels (kernels/lora.py, kernels/lora_fused.py) make per column tile."""

from __future__ import annotations

from ._triton_utils import tl, triton


@triton.jit
def slice_in_tile(slice_starts_ptr, ranks_ptr, slot, s, stride_rank_lora, n_lo, BLOCK_N: tl.constexpr):
    """(hit, lo, hi, rank) of slice s for this slot's adapter: hit when the adapter targets the slice
    (rank > 0) and the slice's columns [lo, hi) overlap the tile's [n_lo, n_lo + BLOCK_N)."""
    lo = tl.load(slice_starts_ptr + s)
    hi = tl.load(slice_starts_ptr + s + 1)
    rank = tl.load(ranks_ptr + slot * stride_rank_lora + s)
    return (rank > 0) & (lo < n_lo + BLOCK_N) & (hi > n_lo), lo, hi, rank
