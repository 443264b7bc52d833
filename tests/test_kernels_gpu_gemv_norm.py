"""GPU (`pytest -m gpu`): RMSNorm fused into the small-batch GEMV (kernels/gemv_norm.py) at real
shapes against the unfused Triton kernels it replaces (rms_norm, then the GEMV with the same tiles),
bf16 Llama-3.1-8B qkv / gate_up and FP8 Llama-3.2-1B shapes; and an engine with it on (decode CUDA
graphs) against one with it off, by vLLM's logprobs-close rule."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from agentserve import SamplingParams  # noqa: E402
from agentserve.kernels import fp8_linear, gemv, gemv_norm, rmsnorm  # noqa: E402
from agentserve.llm import LLM  # noqa: E402
from agentserve.model import fp8 as fp8_model, norm_linear, quant  # noqa: E402
from agentserve.testing import tiny_model_cached  # noqa: E402
from helpers.gpu_kernels import DEV, GPU_SKIPS  # noqa: E402
from helpers.logprobs_close import assert_close_greedy, greedy_result  # noqa: E402

pytestmark = [pytest.mark.gpu, *GPU_SKIPS]


def _activations(m: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=DEV).manual_seed(seed)
    return (torch.randn(m, k, device=DEV, generator=g, dtype=torch.bfloat16),
            torch.randn(m, k, device=DEV, generator=g, dtype=torch.bfloat16),
            (1 + 0.1 * torch.randn(k, device=DEV, generator=g)).to(torch.bfloat16))


@pytest.mark.parametrize("k,n", [(4096, 6144), (4096, 28672)], ids=["qkv", "gate_up"])
def test_bf16_matches_norm_then_gemv(k: int, n: int) -> None:
    x, residual, norm_w = _activations(1, k, seed=n)
    weight = (torch.randn(n, k, device=DEV, dtype=torch.bfloat16) / k ** 0.5).to(torch.bfloat16)
    config = gemv.gemv_config(1, n, k, gemv_norm.sms_of(x))
    y, new_res = gemv_norm.rms_norm_gemv_triton(x, residual, norm_w, 1e-5, weight, config)
    normed, want_res = rmsnorm.rms_norm_triton(x, norm_w, 1e-5, residual)
    want = gemv.gemv_triton(normed, weight, config=config)
    assert torch.equal(new_res, want_res)
    # The same GEMV over the same bf16 inputs, up to the fp32 order of the norm's sum of squares.
    torch.testing.assert_close(y.float(), want.float(), atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("m", [1, 2])
def test_fp8_matches_norm_then_fp8_gemv(m: int) -> None:
    k, n = 2048, 16384  # Llama-3.2-1B's gate_up, the FP8 draft's widest projection
    x, residual, norm_w = _activations(m, k, seed=m)
    weight_q, scale = fp8_linear.quantize_weight_per_channel(torch.randn(n, k, device=DEV) / k ** 0.5)
    config = fp8_linear.fp8_gemv_config(n, k, gemv_norm.sms_of(x))
    y, new_res = gemv_norm.rms_norm_gemv_triton(x, residual, norm_w, 1e-5, weight_q, config, weight_scale=scale)
    normed, want_res = rmsnorm.rms_norm_triton(x, norm_w, 1e-5, residual)
    want = fp8_linear.fp8_gemv_triton(normed, weight_q, scale, config=config)
    assert torch.equal(new_res, want_res)
    torch.testing.assert_close(y.float(), want.float(), atol=2e-2, rtol=1e-2)


def test_engine_with_the_fused_norm_is_logprobs_close(monkeypatch: pytest.MonkeyPatch) -> None:
    prompts = [[5 + (7 * i + j) % 90 for j in range(20 + 9 * i)] for i in range(3)]
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, logprobs=5)

    def run() -> tuple[list[list[int]], list[list[dict[int, float]]]]:
        with LLM(str(tiny_model_cached("llama3")), device="cuda", dtype="bfloat16", max_num_seqs=1,
                 max_model_len=1024, gpu_memory_utilization=0.3) as llm:
            return greedy_result(llm.generate(prompts, params))

    want = run()
    calls = []
    fused = gemv_norm.rms_norm_gemv_triton

    def counted(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return fused(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(norm_linear, "FUSED_NORM_GEMV", True)
    for module in (quant, fp8_model):
        monkeypatch.setattr(module, "rms_norm_gemv_triton", counted)
    got = run()
    assert calls  # the decode steps (batch 1: the Triton GEMV) took the fused kernel
    assert_close_greedy(want, got, "fused norm + GEMV")
