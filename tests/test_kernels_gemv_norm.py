"""RMSNorm fused into the small-batch GEMV (kernels/gemv_norm.py) against the two steps it replaces
(rms_norm_ref, then F.linear or the FP8 reference) in Triton's interpreter: with and without the
residual, bias, one and two rows, K a multiple of the tile or not, 16-bit and e4m3 weights."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from agentserve.kernels import gemv_norm  # noqa: E402
from agentserve.kernels._triton_utils import HAS_TRITON  # noqa: E402
from agentserve.kernels.fp8_linear import fp8_linear_ref, quantize_weight_per_channel  # noqa: E402
from agentserve.kernels.gemv import GemvConfig  # noqa: E402
from agentserve.kernels.rmsnorm import rms_norm_ref  # noqa: E402

_INTERPRETED = HAS_TRITON and type(gemv_norm._rms_norm_gemv_kernel).__name__ == "InterpretedFunction"
pytestmark = pytest.mark.skipif(
    not _INTERPRETED, reason="needs triton with TRITON_INTERPRET=1 set before the kernels are imported")

EPS = 1e-5


def _inputs(m: int, k: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, k, generator=g).to(dtype), torch.randn(m, k, generator=g).to(dtype),
            (1 + 0.1 * torch.randn(k, generator=g)).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("k,block_k", [(256, 64), (200, 64)])  # even and ragged K
def test_matches_norm_then_linear(dtype: torch.dtype, m: int, with_residual: bool, k: int, block_k: int) -> None:
    x, residual, norm_w = _inputs(m, k, dtype, seed=m * 10 + k)
    g = torch.Generator().manual_seed(k)
    weight = torch.randn(36, k, generator=g).to(dtype)  # 36 rows: a partial last block of 8
    bias = torch.randn(36, generator=g).to(dtype)
    res = residual if with_residual else None
    y, new_res = gemv_norm.rms_norm_gemv_triton(x, res, norm_w, EPS, weight, GemvConfig("fma", 8, block_k), bias=bias)
    normed, want_res = rms_norm_ref(x, norm_w, EPS, res)
    want = F.linear(normed, weight, bias)
    assert y.dtype == dtype and y.shape == want.shape
    assert torch.equal(new_res, want_res)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(y.float(), want.float(), rtol=tol, atol=tol * k ** 0.5)


def test_fp8_weights_with_channel_scales() -> None:
    m, k = 1, 256
    x, residual, norm_w = _inputs(m, k, torch.float16, seed=3)
    weight_q, scale = quantize_weight_per_channel(torch.randn(24, k, generator=torch.Generator().manual_seed(4)))
    y, new_res = gemv_norm.rms_norm_gemv_triton(x, residual, norm_w, EPS, weight_q, GemvConfig("fma", 8, 128),
                                                weight_scale=scale)
    normed, want_res = rms_norm_ref(x, norm_w, EPS, residual)
    want = fp8_linear_ref(normed, weight_q, scale)
    assert torch.equal(new_res, want_res)
    torch.testing.assert_close(y.float(), want.float(), rtol=2e-3, atol=2e-2)
