"""GPU (`pytest -m gpu`): the FP8 GEMVs' bit-placement decode of e4m3 weights (kernels/gemv.py, FP8_BITS)
against the hardware-conversion path at the Llama-3.1-8B and Llama-3.2-1B projection shapes, one and two
rows, plain and with the fused gate_up + SiLU: bitwise the same outputs (powers-of-two scalings only)."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from agentserve.kernels import fp8_linear, fp8_utils, gemv_silu  # noqa: E402
from agentserve.kernels._triton_utils import num_sms  # noqa: E402
from helpers.gpu_kernels import DEV, GPU_SKIPS  # noqa: E402

pytestmark = [pytest.mark.gpu, *GPU_SKIPS]


def _both(monkeypatch: pytest.MonkeyPatch, fn):  # type: ignore[no-untyped-def]
    monkeypatch.setattr(fp8_utils, "FP8_BIT_DECODE", False)
    converted = fn()
    monkeypatch.setattr(fp8_utils, "FP8_BIT_DECODE", True)
    return converted, fn()


@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("k,n", [(4096, 6144), (4096, 4096), (14336, 4096), (2048, 3072), (8192, 2048)],
                         ids=["8b-qkv", "8b-o", "8b-down", "1b-qkv", "1b-down"])
def test_fp8_gemv_bit_decode_is_bitwise_the_conversion(monkeypatch: pytest.MonkeyPatch, m: int, k: int, n: int) -> None:
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    weight_q, scale = fp8_linear.quantize_weight_per_channel(torch.randn(n, k, device=DEV) / k ** 0.5)
    converted, decoded = _both(monkeypatch, lambda: fp8_linear.fp8_gemv_triton(x, weight_q, scale))
    assert torch.equal(converted, decoded)


@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("k,n", [(4096, 28672), (2048, 16384)], ids=["8b", "1b"])
def test_fp8_gemv_silu_bit_decode_is_bitwise_the_conversion(monkeypatch: pytest.MonkeyPatch, m: int, k: int,
                                                            n: int) -> None:
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    weight_q, scale = fp8_linear.quantize_weight_per_channel(torch.randn(n, k, device=DEV) / k ** 0.5)
    config = fp8_linear.fp8_gemv_config(n, k, num_sms(x.device))
    converted, decoded = _both(monkeypatch, lambda: gemv_silu.gemv_silu_mul_triton(x, weight_q, config, scale))
    assert torch.equal(converted, decoded)
