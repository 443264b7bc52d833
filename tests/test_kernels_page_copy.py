"""Whole-page gather and scatter for swaps and page copies (kernels/page_copy.py) against torch's index ops over
the pool's page-major view, in Triton's interpreter: bf16, fp32 and fp8 pools, pages in any order, page rows
that are not a power of two words, and a pool too wide for one program per row (chunked rows)."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from agentserve.kernels import page_copy  # noqa: E402
from agentserve.kernels.fp8_utils import FP8_DTYPE, raw_bytes  # noqa: E402
from helpers.interpreter import interpreter_only  # noqa: E402

pytestmark = interpreter_only(page_copy._move_pages_kernel)


def _pool(dtype: torch.dtype, layers: int, blocks: int, page: int, hkv: int, head_dim: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(layers * 31 + head_dim)
    return torch.randn(layers, 2, blocks, page, hkv, head_dim, generator=g).to(dtype)


def _by_page(pool: torch.Tensor) -> torch.Tensor:
    return raw_bytes(pool).permute(2, 0, 1, 3, 4, 5)  # as cache/kv_cache.py's by_page


CASES = [(torch.float32, 2, 7, 4, 2, 8), (torch.bfloat16, 3, 9, 8, 2, 20), (FP8_DTYPE, 2, 7, 16, 1, 12)]


@pytest.mark.parametrize("dtype,layers,blocks,page,hkv,head_dim", CASES)
def test_gather_and_scatter_match_torch_index_ops(dtype: torch.dtype, layers: int, blocks: int, page: int, hkv: int,
                                                  head_dim: int) -> None:
    pool = _pool(dtype, layers, blocks, page, hkv, head_dim)
    assert page_copy.page_rows_supported(raw_bytes(pool))
    ids = torch.tensor([4, 0, 5, 2], dtype=torch.int64)
    staged = page_copy.gather_pages(raw_bytes(pool), ids)
    assert torch.equal(staged, _by_page(pool).index_select(0, ids))  # exact bits, in the swap space's layout
    # Scatter the gathered pages to other pages: the same as index_copy_ on a copy of the pool.
    dst = torch.tensor([1, 3, 6, 0], dtype=torch.int64)
    expected = pool.clone()
    _by_page(expected).index_copy_(0, dst, _by_page(pool).index_select(0, ids))
    page_copy.scatter_pages(raw_bytes(pool), dst, staged)
    assert torch.equal(raw_bytes(pool), raw_bytes(expected))


def test_rows_wider_than_one_program_are_copied_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(page_copy, "MAX_BLOCK_WORDS", 16)  # 40 words per row: chunks of 16, 16 and 8
    pool = _pool(torch.float32, 2, 5, 5, 1, 8)
    ids = torch.tensor([3, 1], dtype=torch.int64)
    assert torch.equal(page_copy.gather_pages(pool, ids), _by_page(pool).index_select(0, ids))
    zeros = torch.zeros(2, *pool.shape[:2], *pool.shape[3:])
    page_copy.scatter_pages(pool, ids, zeros)
    assert not pool[:, :, 3].any() and not pool[:, :, 1].any() and pool[:, :, 0].abs().sum() > 0


def test_a_scatter_of_the_wrong_shape_is_refused() -> None:
    pool = _pool(torch.float32, 2, 5, 5, 1, 8)
    with pytest.raises(ValueError, match="pages"):
        page_copy.scatter_pages(pool, torch.tensor([0, 1]), torch.zeros(2, 2, 5, 1, 8))


def test_rows_of_odd_bytes_are_not_supported() -> None:
    assert not page_copy.page_rows_supported(torch.zeros(1, 2, 3, 1, 1, 3, dtype=torch.bfloat16))  # 6-byte rows
    assert page_copy.page_rows_supported(torch.zeros(1, 2, 3, 1, 1, 2, dtype=torch.bfloat16))
