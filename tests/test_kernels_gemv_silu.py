"""The gate|up GEMV with SiLU-and-multiply in its epilogue (kernels/gemv_silu.py) against the two steps it
replaces (F.linear or the FP8 reference, then silu_and_mul_ref) in Triton's interpreter: one and two
rows, K a multiple of the tile or not, a partial last block of output columns, bias, 16-bit and e4m3
weights; and the MLP's dispatch (model/layers.GatedMLP.activation) on both quant methods."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from agentserve.kernels import gemv_silu  # noqa: E402
from agentserve.kernels.activation import silu_and_mul_ref  # noqa: E402
from agentserve.kernels.fp8_linear import fp8_linear_ref, quantize_weight_per_channel  # noqa: E402
from agentserve.kernels.gemv import GemvConfig  # noqa: E402
from helpers.calls import count_calls  # noqa: E402
from helpers.interpreter import interpreter_only  # noqa: E402

pytestmark = interpreter_only(gemv_silu._gemv_silu_mul_kernel)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("k,block_k", [(256, 64), (200, 64)])  # even and ragged K
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_linear_then_silu_and_mul(dtype: torch.dtype, m: int, k: int, block_k: int, with_bias: bool) -> None:
    g = torch.Generator().manual_seed(m * 100 + k)
    inter = 19  # a partial last block of 4 output columns (8 weight rows per program)
    x = torch.randn(m, k, generator=g).to(dtype)
    weight = (torch.randn(2 * inter, k, generator=g) / k ** 0.5).to(dtype)
    bias = torch.randn(2 * inter, generator=g).to(dtype) if with_bias else None
    out = gemv_silu.gemv_silu_mul_triton(x, weight, GemvConfig("fma", 8, block_k), bias=bias)
    want = silu_and_mul_ref(F.linear(x, weight, bias))
    assert out.dtype == dtype and out.shape == (m, inter)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.float(), want.float(), rtol=tol, atol=tol)


def test_fp8_weights_with_channel_scales_and_leading_dims() -> None:
    g = torch.Generator().manual_seed(5)
    inter, k = 24, 256
    x = torch.randn(2, 1, k, generator=g).to(torch.float16)
    weight_q, scale = quantize_weight_per_channel(torch.randn(2 * inter, k, generator=g) / k ** 0.5)
    out = gemv_silu.gemv_silu_mul_triton(x, weight_q, GemvConfig("fma", 16, 128), weight_scale=scale)
    want = silu_and_mul_ref(fp8_linear_ref(x, weight_q, scale))
    assert out.shape == (2, 1, inter)
    torch.testing.assert_close(out.float(), want.float(), rtol=2e-3, atol=2e-3)


def test_refuses_odd_rows_and_dot_tiles() -> None:
    x = torch.randn(1, 64)
    with pytest.raises(ValueError, match="even number"):
        gemv_silu.gemv_silu_mul_triton(x, torch.randn(7, 64), GemvConfig("fma", 8, 64))
    with pytest.raises(ValueError, match="fma tile"):
        gemv_silu.gemv_silu_mul_triton(x, torch.randn(8, 64), GemvConfig("dot", 16, 64))


def test_mlp_takes_the_fused_kernel_where_the_gemv_would_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """GatedMLP.activation asks the quant method; the unquantized one fuses where use_triton_gemv says
    its GEMV runs (CUDA M == 1; forced here), else the two steps; a disabled flag never fuses."""
    from agentserve.model import layers, quant

    torch.manual_seed(0)
    mlp = layers.GatedMLP(64, 40)
    with torch.no_grad():
        mlp.gate_up_proj.weight.copy_(torch.randn(80, 64) / 8)
        mlp.down_proj.weight.copy_(torch.randn(64, 40) / 8)
    x = torch.randn(1, 64)
    want = silu_and_mul_ref(F.linear(x, mlp.gate_up_proj.weight))
    calls = count_calls(monkeypatch, quant, "gemv_silu_mul_triton")
    torch.testing.assert_close(mlp.activation(x), want)  # CPU: no Triton GEMV, two steps
    assert calls[0] == 0
    monkeypatch.setattr(quant, "use_triton_gemv", lambda x, w: True)
    torch.testing.assert_close(mlp.activation(x), want, rtol=1e-5, atol=1e-5)
    assert calls[0] == 1
    monkeypatch.setattr(layers, "FUSED_SILU_GEMV", False)
    mlp.activation(x)
    assert calls[0] == 1
