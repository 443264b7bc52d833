"""RMSNorm weights folded into the projections (model/folded_norms.py): the fused GEMV variants (the
norm's statistic from the K loop, the residual add in the epilogue) in Triton's interpreter against
references, and engines with folded norms against unfolded ones on the five tiny archs (CPU: the
one-token forward's torch reference, and its fused kernels through the interpreter)."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from agentserve import SamplingParams  # noqa: E402
from agentserve.kernels import gemv, gemv_silu  # noqa: E402
from agentserve.llm import LLM  # noqa: E402
from agentserve.model import folded_norms, llama  # noqa: E402
from agentserve.testing import tiny_model_cached  # noqa: E402
from agentserve.testing.tiny import ARCHS  # noqa: E402
from agentserve.worker import model_runner  # noqa: E402
from helpers.interpreter import interpreter_only  # noqa: E402
from helpers.logprobs_close import assert_close_greedy, greedy_result  # noqa: E402

interpreted = interpreter_only(gemv._gemv_fma_kernel)
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=4e-2, rtol=4e-2)}
EPS = 1e-5


def _rms(x: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)


def _inputs(m: int, n: int, k: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = (3.0 * torch.randn(m, k, generator=g)).to(dtype)  # an RMS of ~3: the statistic matters
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    return x, w, b


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("k,block_k", [(192, 64), (100, 32)])  # even K, a ragged tail
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_with_the_norm_statistic(dtype: torch.dtype, m: int, k: int, block_k: int, bias: bool) -> None:
    x, w, b = _inputs(m, 40, k, dtype, seed=k + m)
    b = b if bias else None
    y = gemv.gemv_triton(x, w, b, config=gemv.GemvConfig("fma", 16, block_k, num_stages=1), norm_eps=EPS)
    ref = F.linear(_rms(x), w.float(), None if b is None else b.float())
    assert y.shape == (m, 40) and y.dtype == dtype
    torch.testing.assert_close(y.float(), ref, **TOL[dtype])


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_with_the_residual_add(dtype: torch.dtype, m: int, bias: bool) -> None:
    a, w, b = _inputs(m, 40, 100, dtype, seed=m)
    b = b if bias else None
    residual = torch.randn(m, 40, generator=torch.Generator().manual_seed(5)).to(dtype)
    y = gemv.gemv_triton(a, w, b, config=gemv.GemvConfig("fma", 16, 32, num_stages=1), residual=residual)
    product = F.linear(a.float(), w.float(), None if b is None else b.float())
    # transformers rounds the projection's output to the model dtype before the add
    torch.testing.assert_close(y.float(), residual.float() + product.to(dtype).float(), **TOL[dtype])
    assert y.data_ptr() != residual.data_ptr()  # the residual stream is not overwritten


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_silu_with_the_norm_statistic(dtype: torch.dtype, bias: bool) -> None:
    inter, k = 19, 200  # a partial last block, a ragged K tail
    x, w, b = _inputs(2, 2 * inter, k, dtype, seed=3)
    b = b if bias else None
    y = gemv_silu.gemv_silu_mul_triton(x, w, gemv.GemvConfig("fma", 8, 64, num_stages=1), bias=b, norm_eps=EPS)
    gate, up = F.linear(_rms(x), w.float(), None if b is None else b.float()).chunk(2, dim=-1)
    torch.testing.assert_close(y.float(), F.silu(gate) * up, **TOL[dtype])


def test_fused_variants_need_fma_tiles() -> None:
    x, w, _ = _inputs(1, 40, 64, torch.float32, seed=0)
    with pytest.raises(ValueError, match="fma tile"):
        gemv.gemv_triton(x, w, config=gemv.GemvConfig("dot", 16, 64), norm_eps=EPS)
    with pytest.raises(ValueError, match="residual"):
        gemv.gemv_triton(x, w, config=gemv.GemvConfig("fma", 16, 64), residual=torch.zeros(1, 39))


PROMPTS = ["The quick brown fox", "def fibonacci(n):", "In a distant galaxy, a small robot named"]
PARAMS = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=5)


def _generate(arch: str, dtype: str = "float32") -> tuple[tuple, bool]:
    # one request at a time: its decode steps are the one-token forwards that take the folded path
    llm = LLM(str(tiny_model_cached(arch)), device="cpu", dtype=dtype, max_num_seqs=1, max_model_len=256)
    result = greedy_result(llm.generate(PROMPTS, PARAMS))
    model = llm.engine.runner.model
    folded = model.norms_folded and all(bool((model.decoder_layer(i).input_layernorm.weight == 1).all())
                                        for i in range(len(model.layers)))
    return result, folded


@pytest.mark.parametrize("arch", ARCHS)
def test_folded_engine_matches_unfolded(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The CPU engine does not fold by itself (no Triton GEMV there): force the fold, whose one-token
    # forwards then run the torch reference of the fused kernels. Random norm weights (testing.tiny).
    ref, folded_ref = _generate(arch)
    assert not folded_ref
    monkeypatch.setattr(model_runner, "fold_norms", lambda m: folded_norms.fold_norms(m, require_triton=False))
    calls = {"one-token": 0}

    def counted(*args: object) -> torch.Tensor:
        calls["one-token"] += 1
        return folded_norms.folded_forward(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(llama, "folded_forward", counted)
    got, folded = _generate(arch)
    assert folded and calls["one-token"] >= len(PROMPTS) * (PARAMS.max_tokens - 1)
    assert_close_greedy(ref, got, f"{arch} folded")
    # fp32: the two differ by rounding alone, so the greedy tokens agree
    assert ref[0] == got[0]


@interpreted
@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: the qkv bias after the norm's scale
def test_folded_engine_through_the_fused_kernels(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    ref, _ = _generate(arch, "bfloat16")
    calls = {"fused": 0}

    def fma_tiles(proj: object, x: torch.Tensor) -> bool:
        calls["fused"] += 1
        return True

    monkeypatch.setattr(model_runner, "fold_norms", lambda m: folded_norms.fold_norms(m, require_triton=False))
    monkeypatch.setattr(folded_norms, "_fma_tiles", fma_tiles)
    got, folded = _generate(arch, "bfloat16")
    assert folded and calls["fused"] > 0
    assert_close_greedy(ref, got, f"{arch} fused kernels")


def test_no_fold_under_lora_or_without_triton() -> None:
    # LoRA wraps the projections (no longer LinearBase) before the fold: nothing folds.
    llm = LLM(str(tiny_model_cached("llama")), device="cpu", dtype="float32", max_num_seqs=2, max_model_len=128,
              enable_lora=True, max_loras=1, max_lora_rank=8)
    model = llm.engine.runner.model
    assert not folded_norms.fold_norms(model, require_triton=False)
    assert not model.norms_folded
    # On the CPU the Triton GEMV does not run: the default fold declines.
    plain = LLM(str(tiny_model_cached("llama")), device="cpu", dtype="float32", max_num_seqs=2, max_model_len=128)
    assert not folded_norms.fold_norms(plain.engine.runner.model)
