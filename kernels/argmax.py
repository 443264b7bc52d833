"""Row-wise argmax over a large vocabulary for the few rows of a small-batch step.

torch's reduction gives each row of [M, V] one thread block, so a greedy token of a batch-1 step (one
row of 128k logits) is a single block walking 512 KB: 27 us on an H200, five of them per speculative
iteration (the draft's four proposals and the verification), against ~3 us of bytes. Here a row is
split over many programs: each takes the maximum of one chunk with its first index, and a second
kernel keeps, per row, the first chunk index at the row's maximum. Ties go to the lowest index and
NaN counts as larger than everything, as torch.argmax does, so greedy tokens are the same.
"""

from __future__ import annotations

import torch

from ._triton_utils import cdiv, next_pow2, tl, triton, triton_enabled_for

# Rows above this keep torch's reduction (one block per row already fills the device).
TRITON_MAX_ROWS = 64
CHUNK = 2048  # columns per program: 63 programs per row of a 128k vocabulary
_INDEX_PAST_END = 2**62


@triton.jit
def _argmax_chunk_kernel(x_ptr, stride_row, n_cols, num_chunks, val_ptr, idx_ptr, CHUNK_SIZE: tl.constexpr):
    """Grid (rows, chunks): the chunk's maximum and the first index holding it."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    offs = chunk * CHUNK_SIZE + tl.arange(0, CHUNK_SIZE)
    mask = offs < n_cols
    x = tl.load(x_ptr + row * stride_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
    # torch.argmax ranks NaN above everything: a chunk holding one reports its first NaN, flagged by
    # a negative index (-1 - index), and the merge prefers flagged chunks.
    is_nan = x != x
    has_nan = tl.max(is_nan.to(tl.int32), axis=0) > 0
    key = tl.where(has_nan, is_nan.to(tl.float32), x)
    best, at = tl.max(key, axis=0, return_indices=True, return_indices_tie_break_left=True)
    first = (chunk * CHUNK_SIZE + at).to(tl.int64)
    out = row * num_chunks + chunk
    tl.store(val_ptr + out, tl.where(has_nan, float("inf"), best))
    tl.store(idx_ptr + out, tl.where(has_nan, -1 - first, first))


@triton.jit
def _argmax_merge_kernel(val_ptr, idx_ptr, num_chunks, out_ptr, CHUNKS: tl.constexpr, PAST_END: tl.constexpr):
    """Grid (rows,): the first index at the row's maximum over its chunks (a NaN chunk first)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, CHUNKS)
    mask = offs < num_chunks
    vals = tl.load(val_ptr + row * num_chunks + offs, mask=mask, other=float("-inf"))
    idx = tl.load(idx_ptr + row * num_chunks + offs, mask=mask, other=PAST_END)
    is_nan = idx < 0
    if tl.max(is_nan.to(tl.int32), axis=0) > 0:
        first = tl.min(tl.where(is_nan, -1 - idx, PAST_END), axis=0)
    else:
        best = tl.max(vals, axis=0)
        first = tl.min(tl.where(vals == best, idx, PAST_END), axis=0)
    tl.store(out_ptr + row, first)


def argmax_triton(x: torch.Tensor) -> torch.Tensor:
    """[M, V] (any float dtype, unit stride along V) -> [M] int64."""
    rows, cols = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    chunks = cdiv(cols, CHUNK)
    vals = torch.empty((rows, chunks), dtype=torch.float32, device=x.device)
    idx = torch.empty((rows, chunks), dtype=torch.int64, device=x.device)
    out = torch.empty(rows, dtype=torch.int64, device=x.device)
    _argmax_chunk_kernel[(rows, chunks)](x, x.stride(0), cols, chunks, vals, idx, CHUNK_SIZE=CHUNK, num_warps=4)
    # (A module global inside a compiled kernel must be a constexpr: passed as one.)
    _argmax_merge_kernel[(rows,)](vals, idx, chunks, out, CHUNKS=next_pow2(chunks), PAST_END=_INDEX_PAST_END,
                                  num_warps=1)
    return out


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(dim=-1) for 2-D x: the split kernel for a few long rows on CUDA, torch otherwise."""
    if x.dim() == 2 and 0 < x.shape[0] <= TRITON_MAX_ROWS and x.shape[1] > CHUNK and triton_enabled_for(x):
        return argmax_triton(x)
    return x.argmax(dim=-1)
