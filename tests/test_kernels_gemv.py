"""Triton GEMV / skinny GEMM against F.linear, in Triton's interpreter on CPU (tiny shapes); the
real 8B shapes run under `-m gpu` (tests/test_kernels_gpu_gemv.py).

The interpreter multiplies bf16 tl.dot operands as raw integers, so bf16 runs only through the
"fma" kernel here; the "dot" kernel's bf16 path is covered on the GPU."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from agentserve.kernels import gemv  # noqa: E402
from agentserve.kernels._triton_utils import cdiv  # noqa: E402
from helpers.interpreter import interpreter_only  # noqa: E402

interpreted = interpreter_only(gemv._gemv_fma_kernel)

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=1e-2, rtol=1e-2),
       torch.bfloat16: dict(atol=4e-2, rtol=4e-2)}
# Llama-3.1-8B decode projections (K -> N): qkv, o, gate_up, down, lm_head.
SHAPES_8B = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096), (4096, 128256)]


def _inputs(m: int, n: int, k: int, dtype: torch.dtype, bias: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) / k ** 0.5).to(dtype)  # outputs ~ N(0, 1)
    w = torch.randn(n, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return x, w, b


def _reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x.float(), w.float(), None if b is None else b.float())


@interpreted
@pytest.mark.parametrize("kind", ["fma", "dot"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 2, 3, 8, 16])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_linear(kind: str, dtype: torch.dtype, m: int, bias: bool) -> None:
    if kind == "dot" and dtype == torch.bfloat16:
        pytest.skip("the interpreter's bf16 tl.dot is wrong; covered by the GPU tests")
    # N not a multiple of BLOCK_N (clamped rows), K a multiple of BLOCK_K (unmasked loop).
    x, w, b = _inputs(m, 40, 192, dtype, bias, seed=m)
    y = gemv.gemv_triton(x, w, b, config=gemv.GemvConfig(kind, 16, 64))
    assert y.shape == (m, 40) and y.dtype == dtype
    torch.testing.assert_close(y.float(), _reference(x, w, b), **TOL[dtype])


@interpreted
@pytest.mark.parametrize("kind", ["fma", "dot"])
def test_ragged_k_strided_x_and_leading_dims(kind: str) -> None:
    dtype = torch.float16
    x, w, b = _inputs(6, 33, 100, dtype, True, seed=3)  # K=100: masked tail of the K loop
    wide = torch.zeros(6, 130, dtype=dtype)
    wide[:, 10:110] = x
    xs = wide[:, 10:110]  # a strided view, as a slice of a fused output would be
    y = gemv.gemv_triton(xs.view(2, 3, 100), w, b, config=gemv.GemvConfig(kind, 16, 32))
    assert y.shape == (2, 3, 33)
    torch.testing.assert_close(y.reshape(6, 33).float(), _reference(x, w, b), **TOL[dtype])


@interpreted
@pytest.mark.parametrize("m", [1, 4, 16])
def test_heuristic_config_runs(m: int) -> None:
    x, w, b = _inputs(m, 96, 256, torch.float16, False, seed=m + 10)
    y = gemv.gemv_triton(x, w)
    torch.testing.assert_close(y.float(), _reference(x, w, b), **TOL[torch.float16])


def test_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError):
        gemv.gemv_triton(torch.randn(17, 8), torch.randn(4, 8))  # M > MAX_M
    with pytest.raises(ValueError):
        gemv.gemv_triton(torch.randn(1, 8), torch.randn(8, 4).t())  # weight rows not contiguous


@pytest.mark.parametrize("m", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("k,n", SHAPES_8B)
def test_config_heuristic_on_8b_shapes(m: int, k: int, n: int) -> None:
    """Pure Python: the tiles fill an H100 several times over, keep the fma accumulator at 32 fp32
    values per thread, and divide K (the unmasked, vectorised loop)."""
    cfg = gemv.gemv_config(m, n, k, sms=132)
    assert cfg.kind == ("fma" if m <= gemv.FMA_MAX_M else "dot")
    assert k % cfg.block_k == 0
    programs = (m if cfg.kind == "fma" else 1) * cdiv(n, cfg.block_n)
    assert programs >= (2 * 132 if cfg.kind == "fma" else 132)
    if cfg.kind == "fma":
        assert cfg.block_n * cfg.block_k <= 32 * 32 * cfg.num_warps
    else:
        assert 16 <= cfg.block_n <= 128


def test_dispatch_modes_on_cpu() -> None:
    x, w, b = _inputs(1, 8, 16, torch.float32, True, seed=0)
    before = gemv.get_gemv_mode()
    try:
        for mode in ("torch", "triton", "auto"):
            gemv.set_gemv_mode(mode)
            assert not gemv.use_triton_gemv(x, w)  # CPU tensors always take F.linear
            assert torch.equal(gemv.linear(x, w, b), F.linear(x, w, b))
        with pytest.raises(ValueError):
            gemv.set_gemv_mode("cublas")
    finally:
        gemv.set_gemv_mode(before)


def test_model_linear_keeps_state_dict_names() -> None:
    from agentserve.model.linear import ReplicatedLinear

    layer = ReplicatedLinear(16, 8, bias=True)
    torch.nn.init.normal_(layer.weight)  # layers allocate with torch.empty: the loader fills them
    torch.nn.init.normal_(layer.bias)
    assert set(layer.state_dict()) == {"weight", "bias"}
    x = torch.randn(3, 16)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
