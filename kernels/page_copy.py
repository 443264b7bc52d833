"""Whole KV pages gathered into, or scattered from, a page-major buffer: swaps and page copies.

The pool is one allocation [L, 2, num_blocks, block_size, Hkv, D] (cache/kv_cache.py), so a page is 2L
separate rows of block_size x Hkv x D elements, one per layer and K/V. A swap moves pages as
[n, L, 2, block_size, Hkv, D] (the swap space's layout). torch's index_select / index_copy_ over the
pool's page-major view do that with per-element offset arithmetic on 2-byte (or 1-byte fp8) elements,
the strided-copy path that ran at ~0.7 TB/s on the H200 for the prefill gather (kernels/kv_gather.py).
Here each program moves one contiguous chunk of one page row with 16-byte loads and stores: grid
(pages, 2L, chunks per row), the pool and the buffer both seen as 32-bit words.

`page_rows` gives the [2L, num_blocks, row_words] word view both kernels take; rows whose byte size is
not a multiple of 4 (never for real head sizes) keep torch's index ops (kv_cache.py decides).
"""

from __future__ import annotations

import torch

from ._triton_utils import cdiv, next_pow2, tl, triton

MAX_BLOCK_WORDS = 2048  # 8 KiB per program: 16 words (64 bytes) per thread at 4 warps


def page_rows(pool: torch.Tensor) -> torch.Tensor:
    """The pool [L, 2, num_blocks, ...] as 32-bit words [2L, num_blocks, row_words] (a view)."""
    layers, kv, num_blocks = pool.shape[:3]
    return pool.view(torch.uint8).view(torch.int32).view(layers * kv, num_blocks, -1)


def page_rows_supported(pool: torch.Tensor) -> bool:
    """Whether page_rows can view the pool: contiguous, each page row a whole number of words."""
    row_bytes = pool[0, 0, 0].numel() * pool.element_size()
    return pool.is_contiguous() and row_bytes % 4 == 0


@triton.jit
def _move_pages_kernel(rows_ptr, buf_ptr, ids_ptr, num_blocks, ROW_WORDS: tl.constexpr, NUM_ROWS: tl.constexpr,
                       BLOCK: tl.constexpr, TO_POOL: tl.constexpr):
    """One chunk of BLOCK words between rows[r, ids[i], :] and buf[i, r, :]: a gather into buf, or with
    TO_POOL a scatter into the pool's rows."""
    i = tl.program_id(0)
    r = tl.program_id(1)
    c = tl.program_id(2)
    page = tl.load(ids_ptr + i).to(tl.int64)
    offs = c * BLOCK + tl.arange(0, BLOCK)
    mask = offs < ROW_WORDS
    pool_row = rows_ptr + (r * num_blocks + page) * ROW_WORDS + offs
    buf_row = buf_ptr + (i.to(tl.int64) * NUM_ROWS + r) * ROW_WORDS + offs
    if TO_POOL:
        tl.store(pool_row, tl.load(buf_row, mask=mask), mask=mask)
    else:
        tl.store(buf_row, tl.load(pool_row, mask=mask), mask=mask)


def _grid(n: int, rows: torch.Tensor) -> tuple[tuple[int, int, int], int]:
    block = min(MAX_BLOCK_WORDS, next_pow2(rows.shape[2]))
    return (n, rows.shape[0], cdiv(rows.shape[2], block)), block


def gather_pages(pool: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Pages `ids` (int64 device tensor) of the pool, as [n, L, 2, *page] in the pool's dtype."""
    rows = page_rows(pool)
    n = ids.shape[0]
    out = torch.empty((n, *pool.shape[:2], *pool.shape[3:]), dtype=pool.dtype, device=pool.device)
    if n:
        grid, block = _grid(n, rows)
        _move_pages_kernel[grid](rows, out.view(torch.uint8).view(torch.int32), ids, rows.shape[1],
                                 ROW_WORDS=rows.shape[2], NUM_ROWS=rows.shape[0], BLOCK=block, TO_POOL=False, num_warps=4)
    return out


def scatter_pages(pool: torch.Tensor, ids: torch.Tensor, pages: torch.Tensor) -> None:
    """Writes pages [n, L, 2, *page] (the pool's dtype, contiguous) into the pool's pages `ids`."""
    rows = page_rows(pool)
    n = ids.shape[0]
    expected = (n, *pool.shape[:2], *pool.shape[3:])
    if tuple(pages.shape) != expected or pages.dtype != pool.dtype:
        raise ValueError(f"pages {tuple(pages.shape)} {pages.dtype} do not match {expected} {pool.dtype}")
    if n:
        grid, block = _grid(n, rows)
        _move_pages_kernel[grid](rows, pages.contiguous().view(torch.uint8).view(torch.int32), ids, rows.shape[1],
                                 ROW_WORDS=rows.shape[2], NUM_ROWS=rows.shape[0], BLOCK=block, TO_POOL=True, num_warps=4)
