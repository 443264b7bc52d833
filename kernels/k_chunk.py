"""The GEMVs' K-chunk load (kernels/gemv.py's fma loop, plain and grouped, and its dot loop)."""

from __future__ import annotations

from ._triton_utils import tl, triton


@triton.jit
def load_k_chunk(ptrs, offs_k, k0, K, EVEN_K: tl.constexpr, TILE: tl.constexpr):
    """The K chunk at k0 of a tile of rows whose other axes are `offs_k`'s ([rows, BLOCK_K], or [rows,
    BLOCK_K / 8, 8] for groups of 8) with TILE, or of x over `offs_k`; zero past K unless EVEN_K (then the
    load is unmasked and vectorises)."""
    if EVEN_K:
        chunk = tl.load(ptrs)
    else:
        k_mask = offs_k + k0 < K
        chunk = tl.load(ptrs, mask=tl.expand_dims(k_mask, 0) if TILE else k_mask, other=0.0)
    return chunk
