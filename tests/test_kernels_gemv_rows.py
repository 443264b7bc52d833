"""The weight-stationary few-rows GEMV (kernels/gemv_rows.py) against F.linear in Triton's interpreter:
M = 2..8 (padded row tiles), K a multiple of the tile or not, a partial last weight block, bias,
leading dims, fp32 and fp16; and the dispatch in kernels/gemv.linear."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from agentserve.kernels import gemv, gemv_rows  # noqa: E402
from agentserve.kernels._triton_utils import HAS_TRITON  # noqa: E402

_INTERPRETED = HAS_TRITON and type(gemv_rows._gemv_rows_kernel).__name__ == "InterpretedFunction"
pytestmark = pytest.mark.skipif(
    not _INTERPRETED, reason="needs triton with TRITON_INTERPRET=1 set before the kernels are imported")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m", [2, 3, 5, 8])
@pytest.mark.parametrize("k,block_k", [(256, 64), (200, 64)])  # even and ragged K
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_linear(dtype: torch.dtype, m: int, k: int, block_k: int, with_bias: bool) -> None:
    g = torch.Generator().manual_seed(m * 1000 + k)
    x = torch.randn(m, k, generator=g).to(dtype)
    weight = (torch.randn(37, k, generator=g) / k ** 0.5).to(dtype)  # a partial last block of 4 rows
    bias = torch.randn(37, generator=g).to(dtype) if with_bias else None
    out = gemv_rows.gemv_rows_triton(x, weight, bias, config=(4, block_k, 4))
    want = F.linear(x, weight, bias)
    assert out.dtype == dtype and out.shape == (m, 37)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.float(), want.float(), rtol=tol, atol=tol)


def test_leading_dims_default_tiles_and_limits() -> None:
    x = torch.randn(1, 5, 512)
    weight = torch.randn(64, 512) / 512 ** 0.5
    out = gemv_rows.gemv_rows_triton(x, weight)  # rows_config's tiles
    torch.testing.assert_close(out, F.linear(x, weight), rtol=1e-5, atol=1e-5)
    assert out.shape == (1, 5, 64)
    assert gemv_rows.rows_config(5, 28672, 4096) == (4, 256, 4)  # 8 x 4 x 256 partials
    assert gemv_rows.rows_config(2, 4096, 14336) == (2, 2048, 4)  # long K: 2 weight rows, 2 x 2 x 2048
    with pytest.raises(ValueError, match="M <= 8"):
        gemv_rows.gemv_rows_triton(torch.randn(9, 512), weight)


def test_dispatch_only_where_flagged_on_cuda_and_few_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    w = torch.randn(8, 16, dtype=torch.bfloat16)
    monkeypatch.setattr(gemv, "GEMV_ROWS", True)
    assert not gemv.use_gemv_rows(torch.randn(4, 16, dtype=torch.bfloat16), w)  # CPU tensors: never
    monkeypatch.setattr(gemv, "triton_enabled_for", lambda t: True)
    assert gemv.use_gemv_rows(torch.randn(4, 16, dtype=torch.bfloat16), w)
    assert gemv.use_gemv_rows(torch.randn(2, 16, dtype=torch.bfloat16), w)
    assert not gemv.use_gemv_rows(torch.randn(1, 16, dtype=torch.bfloat16), w)  # the one-row GEMV's
    assert not gemv.use_gemv_rows(torch.randn(9, 16, dtype=torch.bfloat16), w)  # cuBLAS
    assert not gemv.use_gemv_rows(torch.randn(4, 16), w.float())  # fp32 always goes to F.linear
    monkeypatch.setattr(gemv, "GEMV_ROWS", False)
    assert not gemv.use_gemv_rows(torch.randn(4, 16, dtype=torch.bfloat16), w)
