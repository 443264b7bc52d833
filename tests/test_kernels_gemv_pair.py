"""The two-row GEMVs (kernels/gemv_pair.py: one program per weight block for both rows of x) in Triton's
interpreter, against the one-row kernels they replace at M == 2 and the references: FP8 weights with
channel scales, with and without bias, K a multiple of the tile or ragged, a partial last block; the
gate|up + SiLU variant on 16-bit and e4m3 weights. And the dispatch: M == 2 takes them only when
PAIR_ROWS is on, M == 1 never."""

from __future__ import annotations

import os
from typing import Iterator

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from agentserve.kernels import fp8_linear, gemv_pair, gemv_silu  # noqa: E402
from agentserve.kernels.activation import silu_and_mul_ref  # noqa: E402
from agentserve.kernels.gemv import GemvConfig  # noqa: E402
from helpers.calls import count_calls  # noqa: E402
from helpers.interpreter import interpreter_only  # noqa: E402

pytestmark = interpreter_only(gemv_pair._fp8_gemv_pair_kernel)


@pytest.fixture
def pair_rows() -> Iterator[None]:
    before = gemv_pair.PAIR_ROWS
    gemv_pair.set_pair_rows(True)
    yield
    gemv_pair.set_pair_rows(before)


def _fp8_case(seed: int, n: int, k: int, with_bias: bool) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, k, generator=g).to(torch.float16)
    weight_q, scale = fp8_linear.quantize_weight_per_channel(torch.randn(n, k, generator=g) / k ** 0.5)
    bias = torch.randn(n, generator=g).to(torch.float16) if with_bias else torch.empty(0)
    return x, weight_q, scale, bias


@pytest.mark.parametrize("k,block_k", [(256, 64), (200, 64)])  # even and ragged K
@pytest.mark.parametrize("with_bias", [False, True])
def test_fp8_pair_matches_the_one_row_kernel_and_the_reference(pair_rows: None, k: int, block_k: int,
                                                               with_bias: bool) -> None:
    x, weight_q, scale, bias = _fp8_case(k + with_bias, 37, k, with_bias)  # 37 rows: a partial last block of 8
    b = bias if with_bias else None
    cfg = GemvConfig("fma", 8, block_k, num_warps=4, num_stages=1)
    pair = fp8_linear.fp8_gemv_triton(x, weight_q, scale, b, config=cfg)
    gemv_pair.set_pair_rows(False)
    one_row = fp8_linear.fp8_gemv_triton(x, weight_q, scale, b, config=cfg)
    assert pair.shape == (2, 37) and pair.dtype == torch.float16
    torch.testing.assert_close(pair.float(), one_row.float(), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(pair.float(), fp8_linear.fp8_linear_ref(x, weight_q, scale, b).float(),
                               rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("fp8", [False, True])
def test_silu_pair_matches_linear_then_silu_and_mul(pair_rows: None, fp8: bool) -> None:
    g = torch.Generator().manual_seed(11 + fp8)
    inter, k = 19, 256
    x = torch.randn(2, k, generator=g).to(torch.float16)
    dense = torch.randn(2 * inter, k, generator=g) / k ** 0.5
    if fp8:
        weight, scale = fp8_linear.quantize_weight_per_channel(dense)
        want = silu_and_mul_ref(fp8_linear.fp8_linear_ref(x, weight, scale))
    else:
        weight, scale = dense.to(torch.float16), None
        want = silu_and_mul_ref(F.linear(x, weight))
    out = gemv_silu.gemv_silu_mul_triton(x, weight, GemvConfig("fma", 8, 64), weight_scale=scale)
    assert out.shape == (2, inter)
    torch.testing.assert_close(out.float(), want.float(), rtol=2e-3, atol=2e-3)


def test_only_two_rows_take_the_pair_kernels_and_only_when_on(monkeypatch: pytest.MonkeyPatch) -> None:
    x, weight_q, scale, _ = _fp8_case(3, 16, 128, False)
    calls = count_calls(monkeypatch, gemv_pair, "fp8_gemv_pair")
    cfg = GemvConfig("fma", 8, 64)
    gemv_pair.set_pair_rows(False)
    fp8_linear.fp8_gemv_triton(x, weight_q, scale, config=cfg)
    assert calls == [0]
    monkeypatch.setattr(gemv_pair, "PAIR_ROWS", True)
    fp8_linear.fp8_gemv_triton(x[:1], weight_q, scale, config=cfg)
    assert calls == [0]
    fp8_linear.fp8_gemv_triton(x, weight_q, scale, config=cfg)
    assert calls == [1]


def test_pair_warps_keep_two_accumulators_within_the_one_row_budget() -> None:
    assert gemv_pair.pair_warps(16, 512, 8) == 8     # 32 fp32 per accumulator and thread
    assert gemv_pair.pair_warps(8, 1024, 4) == 8     # 64 per thread at 4 warps: doubled
    assert gemv_pair.pair_warps(4, 2048, 4) == 8
