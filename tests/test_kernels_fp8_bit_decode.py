"""The FP8 GEMVs' bit-placement decode of e4m3 weights (kernels/gemv.py e4m3_bits_as_scaled_f32, FP8_BITS)
against the conversion path it replaces, in Triton's interpreter: every e4m3 byte but NaN decodes to its
value times 2^-120 (subnormals and signed zeros included), and the FP8 GEMV and the fused gate_up + SiLU
GEMV give bitwise the same outputs either way (the scalings are powers of two), on weights that hold
every byte pattern, with one and two rows and a ragged K."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from agentserve.kernels import fp8_linear, fp8_utils, gemv, gemv_silu  # noqa: E402
from agentserve.kernels._triton_utils import tl, triton  # noqa: E402
from agentserve.kernels.fp8_utils import FP8_DTYPE  # noqa: E402
from agentserve.kernels.gemv import GemvConfig  # noqa: E402
from helpers.interpreter import interpreter_only  # noqa: E402

pytestmark = interpreter_only(fp8_linear._fp8_gemv_kernel)

# Every e4m3fn byte except the two NaNs (0x7F, 0xFF): the bit decode leaves those undefined.
FINITE_BYTES = torch.tensor([b for b in range(256) if b & 0x7F != 0x7F], dtype=torch.uint8)


@triton.jit
def _decode_kernel(in_ptr, out_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(out_ptr + offs, gemv.e4m3_bits_as_scaled_f32(tl.load(in_ptr + offs)))


def test_every_finite_byte_decodes_to_its_value_times_2_pow_minus_120() -> None:
    n = 256
    raw = torch.cat([FINITE_BYTES, FINITE_BYTES[:n - len(FINITE_BYTES)]])
    out = torch.empty(n, dtype=torch.float32)
    _decode_kernel[(1,)](raw, out, N=n)
    want = raw.view(FP8_DTYPE).float() * 2.0 ** -120
    assert torch.equal(out, want)
    assert torch.equal(torch.signbit(out), torch.signbit(raw.view(FP8_DTYPE).float()))  # -0.0 stays -0.0


def _all_byte_weight(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(FINITE_BYTES), (n, k), generator=g)
    return FINITE_BYTES[idx].view(FP8_DTYPE)


@pytest.fixture
def both_decodes(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    def run(fn):  # type: ignore[no-untyped-def]
        monkeypatch.setattr(fp8_utils, "FP8_BIT_DECODE", False)
        converted = fn()
        monkeypatch.setattr(fp8_utils, "FP8_BIT_DECODE", True)
        return converted, fn()
    return run


@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("k,block_k", [(256, 64), (200, 64)])  # even and ragged K
def test_fp8_gemv_bitwise_equal_either_decode(both_decodes, m: int, k: int, block_k: int) -> None:  # type: ignore[no-untyped-def]
    n = 37
    weight_q = _all_byte_weight(n, k, seed=k + m)
    scale = torch.rand(n, generator=torch.Generator().manual_seed(1)) * 1e-2 + 1e-4
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(2)) * 3).to(torch.bfloat16)
    bias = torch.randn(n).to(torch.bfloat16)
    config = GemvConfig("fma", 8, block_k)
    converted, decoded = both_decodes(lambda: fp8_linear.fp8_gemv_triton(x, weight_q, scale, bias, config=config))
    assert torch.equal(converted, decoded)
    want = fp8_linear.fp8_linear_ref(x.float(), weight_q, scale, bias.float())
    torch.testing.assert_close(decoded.float(), want, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("m", [1, 2])
def test_fp8_gemv_silu_bitwise_equal_either_decode(both_decodes, m: int) -> None:  # type: ignore[no-untyped-def]
    inter, k = 24, 256
    weight_q = _all_byte_weight(2 * inter, k, seed=5)
    scale = torch.rand(2 * inter, generator=torch.Generator().manual_seed(3)) * 1e-2 + 1e-4
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    config = GemvConfig("fma", 16, 128)
    converted, decoded = both_decodes(lambda: gemv_silu.gemv_silu_mul_triton(x, weight_q, config, scale))
    assert torch.equal(converted, decoded)


def test_sixteen_bit_weights_never_take_the_bit_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused gate_up + SiLU GEMV also serves 16-bit weights: the flag must not reinterpret them."""
    monkeypatch.setattr(fp8_utils, "FP8_BIT_DECODE", True)
    inter, k = 8, 128
    weight = torch.randn(2 * inter, k).to(torch.bfloat16)
    x = torch.randn(1, k).to(torch.bfloat16)
    out = gemv_silu.gemv_silu_mul_triton(x, weight, GemvConfig("fma", 8, 64))
    gate, up = (x.float() @ weight.float().T).to(torch.bfloat16).float().split(inter, dim=-1)
    want = (torch.nn.functional.silu(gate).to(torch.bfloat16).float() * up)
    torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=2e-2)
