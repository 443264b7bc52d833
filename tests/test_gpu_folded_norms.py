"""GPU (`pytest -m gpu`): RMSNorm weights folded into the projections (model/folded_norms.py). The fused
GEMVs at Llama-3.1-8B's shapes against the kernels they replace (the norm kernel, then the GEMV; the
GEMV, then the residual add), and engines with the fold (decode CUDA graphs, batch 1) against engines
without it on the five tiny archs, by vLLM's logprobs-close rule. tests/test_gpu_engine.py compares the
folded engine (the default) with transformers."""

from __future__ import annotations

import pytest
import torch

from agentserve import SamplingParams
from agentserve.kernels import gemv, gemv_silu, rmsnorm
from agentserve.kernels._triton_utils import num_sms
from agentserve.llm import LLM
from agentserve.model import folded_norms, llama
from agentserve.testing import tiny_model_cached
from agentserve.testing.tiny import ARCHS
from helpers.gpu_kernels import DEV, GPU_SKIPS
from helpers.logprobs_close import assert_close_greedy, greedy_result

pytestmark = [pytest.mark.gpu, *GPU_SKIPS]
EPS = 1e-5


def _x(k: int, seed: int) -> torch.Tensor:
    return 3.0 * torch.randn(1, k, device=DEV, generator=torch.Generator(DEV).manual_seed(seed)).to(torch.bfloat16)


def _weight(n: int, k: int) -> torch.Tensor:
    return (torch.randn(n, k, device=DEV) / k ** 0.5).to(torch.bfloat16)


@pytest.mark.parametrize("k,n", [(4096, 6144), (4096, 4096), (4096, 128256)], ids=["qkv", "o", "lm_head"])
def test_norm_statistic_matches_the_norm_kernel_then_the_gemv(k: int, n: int) -> None:
    x, weight = _x(k, n), _weight(n, k)
    normed, _ = rmsnorm.rms_norm_triton(x, torch.ones(k, device=DEV, dtype=torch.bfloat16), EPS)
    want = gemv.gemv_triton(normed, weight)
    got = gemv.gemv_triton(x, weight, norm_eps=EPS)
    # the fused kernel skips the bf16 rounding of the normalised row: a few bf16 ulps of the outputs
    torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=2e-2)


@pytest.mark.parametrize("k,n", [(4096, 4096), (14336, 4096)], ids=["o", "down"])
def test_residual_add_matches_the_gemv_then_the_add(k: int, n: int) -> None:
    a, weight, residual = _x(k, 1) / 3, _weight(n, k), _x(n, 2)
    got = gemv.gemv_triton(a, weight, residual=residual)
    want = residual + gemv.gemv_triton(a, weight)
    assert torch.equal(got, want)  # the same tiles, the same roundings


def test_gate_up_silu_with_the_norm_statistic() -> None:
    k, n = 4096, 28672
    x, weight = _x(k, 3), _weight(n, k)
    config = gemv.gemv_config(1, n, k, num_sms(x.device))
    normed, _ = rmsnorm.rms_norm_triton(x, torch.ones(k, device=DEV, dtype=torch.bfloat16), EPS)
    want = gemv_silu.gemv_silu_mul_triton(normed, weight, config)
    got = gemv_silu.gemv_silu_mul_triton(x, weight, config, norm_eps=EPS)
    torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=2e-2)


PROMPTS = ["The quick brown fox", "In a distant galaxy, a small robot named", "def fibonacci(n):"]
PARAMS = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, logprobs=5)


def _generate(arch: str) -> tuple[tuple, bool]:
    with LLM(str(tiny_model_cached(arch)), device="cuda", dtype="bfloat16", max_num_seqs=1, max_model_len=512,
             gpu_memory_utilization=0.2) as llm:
        assert llm.engine.runner.graphs is not None
        return greedy_result(llm.generate(PROMPTS, PARAMS)), llm.engine.runner.model.norms_folded


@pytest.mark.parametrize("arch", ARCHS)
def test_folded_engine_is_logprobs_close_to_unfolded(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(folded_norms, "FOLD_NORMS", False)
    want, folded = _generate(arch)
    assert not folded
    monkeypatch.setattr(folded_norms, "FOLD_NORMS", True)
    calls = {"fused": 0}
    real = gemv.gemv_triton

    def counted(*args: object, **kwargs: object) -> torch.Tensor:
        calls["fused"] += kwargs.get("norm_eps") is not None or kwargs.get("residual") is not None
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(folded_norms, "gemv_triton", counted)
    got, folded = _generate(arch)
    assert folded and calls["fused"] > 0 and llama.folded_forward is folded_norms.folded_forward
    assert_close_greedy(want, got, f"{arch} folded norms")
