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


@triton.jit
def any_slice_in_tile(slice_starts_ptr, ranks_ptr, slot, stride_rank_lora, n_lo,
                      NUM_SLICES: tl.constexpr, BLOCK_N: tl.constexpr):
    """Whether any slice the adapter targets has columns in the tile (else the tile adds nothing)."""
    touched = 0
    for s in tl.static_range(NUM_SLICES):
        hit, _lo, _hi, _rank = slice_in_tile(slice_starts_ptr, ranks_ptr, slot, s, stride_rank_lora, n_lo, BLOCK_N)
        touched += hit.to(tl.int32)
    return touched > 0


@triton.jit
def tile_rows(sorted_ids_ptr, block_start_ptr, block_end_ptr, tile, BLOCK_M: tl.constexpr):
    """(token rows, row mask) of a tile of the tile map: rows past the segment are clamped onto its
    last row (loads stay unmasked), the mask is for the stores."""
    start = tl.load(block_start_ptr + tile)
    end = tl.load(block_end_ptr + tile)
    offs_m = start + tl.arange(0, BLOCK_M)
    # Clamped at 0 too: an unused tile (empty segment) may read its rows before it returns (the
    # kernels load their metadata before the PDL wait), and must not read before the buffer.
    rows = tl.load(sorted_ids_ptr + tl.maximum(tl.minimum(offs_m, end - 1), 0)).to(tl.int64)
    return rows, offs_m < end


@triton.jit
def shrink_tile(acc, x_ptrs, a_ptrs, r_mask, offs_kk, k_start, K, STEP: tl.constexpr, EVEN_K: tl.constexpr,
                UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc [BLOCK_M, BLOCK_R] fp32 plus the sum over K chunks k_start, k_start + STEP, ... of x . A^T:
    the pointers start at chunk k_start (x rows along dim 0, A's rank rows along dim 0), rank rows
    past r_mask are not loaded. Shared by the split-K shrink (kernels/lora.py) and the fused kernel
    (kernels/lora_fused.py)."""
    for k0 in range(k_start, K, STEP):
        if EVEN_K:
            x = tl.load(x_ptrs)
            a = tl.load(a_ptrs, mask=r_mask[:, None], other=0.0)
        else:
            k_mask = offs_kk < K - k0
            x = tl.load(x_ptrs, mask=k_mask[None, :], other=0.0)
            a = tl.load(a_ptrs, mask=r_mask[:, None] & k_mask[None, :], other=0.0)
        acc = shrink_dot(acc, x, a, UPCAST, DOT_PRECISION)
        x_ptrs += STEP
        a_ptrs += STEP
    return acc


@triton.jit
def shrink_dot(acc, x, a, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + x . a^T for one K chunk (x [BLOCK_M, BLOCK_K], a [BLOCK_R, BLOCK_K] as loaded)."""
    if UPCAST:
        x = x.to(tl.float32)
        a = a.to(tl.float32)
    return tl.dot(x.to(a.dtype), tl.trans(a), acc, input_precision=DOT_PRECISION)


@triton.jit
def expand_slice(acc, h, scale, b_base, r_mask, offs_n, lo, hi, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + (scale * h) @ B over the slice's columns [lo, hi) of the tile (h rounded to B's dtype, so
    both LoRA paths feed the tensor cores the same operands)."""
    n_mask = (offs_n >= lo) & (offs_n < hi)
    b = tl.load(b_base, mask=r_mask[:, None] & n_mask[None, :], other=0.0)
    return expand_dot(acc, h, scale, b, UPCAST, DOT_PRECISION)


@triton.jit
def expand_dot(acc, h, scale, b, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + (scale * h) @ b, b the slice's [BLOCK_R, BLOCK_N] tile of B with rows past the rank and
    columns outside the slice zeroed."""
    if UPCAST:
        b = b.to(tl.float32)
    return tl.dot((h * scale).to(b.dtype), b, acc, input_precision=DOT_PRECISION)


@triton.jit
def add_to_rows(y_ptr, acc, rows, m_mask, offs_n, N, stride_ym):
    """y[rows, offs_n] += acc (read, add in fp32, write: each element has one writer)."""
    y_ptrs = y_ptr + rows[:, None] * stride_ym + offs_n[None, :]
    y_mask = m_mask[:, None] & (offs_n[None, :] < N)
    y = tl.load(y_ptrs, mask=y_mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + acc).to(y_ptr.dtype.element_ty), mask=y_mask)
