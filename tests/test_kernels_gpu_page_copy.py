"""GPU tests of the whole-page gather and scatter (kernels/page_copy.py) at Llama-3.1-8B's page shape (run with
`pytest -m gpu`; skipped without a GPU): the same bits as torch's index ops in bf16 and fp8, and a KV cache's
swap out and back in through them moving every page exactly."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from agentserve.cache import kv_cache  # noqa: E402
from agentserve.cache.kv_cache import KVCache  # noqa: E402
from agentserve.kernels import page_copy  # noqa: E402
from agentserve.kernels.fp8_utils import FP8_DTYPE, raw_bytes  # noqa: E402
from helpers.gpu_kernels import DEV, GPU_SKIPS  # noqa: E402

pytestmark = [pytest.mark.gpu, *GPU_SKIPS]


@pytest.mark.parametrize("dtype", [torch.bfloat16, FP8_DTYPE])
def test_gather_and_scatter_match_index_ops_at_8b_pages(dtype: torch.dtype) -> None:
    g = torch.Generator(device=DEV).manual_seed(3)
    pool = torch.randn(32, 2, 96, 16, 8, 128, device=DEV, generator=g).to(dtype)
    by_page = raw_bytes(pool).permute(2, 0, 1, 3, 4, 5)
    ids = torch.randperm(96, device=DEV, generator=g)[:40]
    staged = page_copy.gather_pages(raw_bytes(pool), ids)
    assert torch.equal(staged, by_page.index_select(0, ids))
    dst = torch.randperm(96, device=DEV, generator=g)[:40]
    expected = raw_bytes(pool).clone()
    expected.permute(2, 0, 1, 3, 4, 5).index_copy_(0, dst, staged)
    page_copy.scatter_pages(raw_bytes(pool), dst, staged)
    assert torch.equal(raw_bytes(pool), expected)


def test_a_swap_round_trip_through_the_page_kernels_moves_every_page_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kv_cache, "PAGE_COPY", "triton")
    cache = KVCache(4, 64, 16, 8, 128, torch.bfloat16, torch.device(DEV), num_swap_blocks=48)
    assert cache._page_kernels()
    cache.pool.copy_(torch.randn_like(cache.pool))
    before = cache.pool.clone()
    pages = list(range(3, 43))
    cache.swap_out(pages, list(range(40)))
    cache.pool.zero_()
    cache.swap_in_start(list(range(40)), ticket=1)
    cache.swap_in_finish(pages, ticket=1)
    cache.copy_blocks([(3, 50), (4, 51)])
    torch.cuda.synchronize()
    assert torch.equal(cache.pool[:, :, 3:43], before[:, :, 3:43])
    assert torch.equal(cache.pool[:, :, 50:52], before[:, :, 3:5])
