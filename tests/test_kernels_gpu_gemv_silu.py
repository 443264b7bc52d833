"""GPU (`pytest -m gpu`): the gate|up GEMV with SiLU-and-multiply in its epilogue (kernels/gemv_silu.py) at
real shapes against the two Triton kernels it replaces (the GEMV with the same tiles, then
silu_and_mul), bf16 Llama-3.1-8B and FP8 Llama-3.2-1B gate_up; and an engine with it (decode CUDA
graphs, bf16 and FP8 weights) against one without, by vLLM's logprobs-close rule."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from agentserve import SamplingParams  # noqa: E402
from agentserve.kernels import activation, fp8_linear, gemv, gemv_silu  # noqa: E402
from agentserve.kernels._triton_utils import num_sms  # noqa: E402
from agentserve.llm import LLM  # noqa: E402
from agentserve.model import fp8 as fp8_model, layers, quant  # noqa: E402
from agentserve.testing import tiny_model_cached  # noqa: E402
from helpers.calls import count_calls  # noqa: E402
from helpers.gpu_kernels import DEV, GPU_SKIPS  # noqa: E402
from helpers.logprobs_close import assert_close_greedy, greedy_result  # noqa: E402

pytestmark = [pytest.mark.gpu, *GPU_SKIPS]


@pytest.mark.parametrize("k,n", [(4096, 28672), (8192, 8192)], ids=["8b", "long-k"])
def test_bf16_matches_gemv_then_silu_and_mul(k: int, n: int) -> None:
    # Llama-3.1-8B's gate_up; K >= 8192 (70B-class hidden sizes) takes 2-row tiles: one output column each.
    x = torch.randn(1, k, device=DEV, dtype=torch.bfloat16)
    weight = (torch.randn(n, k, device=DEV) / k ** 0.5).to(torch.bfloat16)
    config = gemv.gemv_config(1, n, k, num_sms(x.device))
    out = gemv_silu.gemv_silu_mul_triton(x, weight, config)
    want = activation.silu_and_mul_triton(gemv.gemv_triton(x, weight, config=config))
    # The same rounding steps; only the GEMV's fp32 reduction order may differ between tile shapes.
    torch.testing.assert_close(out.float(), want.float(), atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("m", [1, 2])
def test_fp8_matches_fp8_gemv_then_silu_and_mul(m: int) -> None:
    k, n = 2048, 16384  # Llama-3.2-1B's gate_up, the FP8 draft's widest projection
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    weight_q, scale = fp8_linear.quantize_weight_per_channel(torch.randn(n, k, device=DEV) / k ** 0.5)
    config = fp8_linear.fp8_gemv_config(n, k, num_sms(x.device))
    out = gemv_silu.gemv_silu_mul_triton(x, weight_q, config, weight_scale=scale)
    want = activation.silu_and_mul_triton(fp8_linear.fp8_gemv_triton(x, weight_q, scale, config=config))
    torch.testing.assert_close(out.float(), want.float(), atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("quantization", [None, "fp8"])
def test_engine_with_the_fused_activation_is_logprobs_close(monkeypatch: pytest.MonkeyPatch,
                                                            quantization: str | None) -> None:
    prompts = [[5 + (7 * i + j) % 90 for j in range(20 + 9 * i)] for i in range(3)]
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, logprobs=5)

    def run() -> tuple[list[list[int]], list[list[dict[int, float]]]]:
        with LLM(str(tiny_model_cached("llama3")), device="cuda", dtype="bfloat16", max_num_seqs=1,
                 max_model_len=1024, gpu_memory_utilization=0.3, quantization=quantization) as llm:
            return greedy_result(llm.generate(prompts, params))

    monkeypatch.setattr(layers, "FUSED_SILU_GEMV", False)
    want = run()
    monkeypatch.setattr(layers, "FUSED_SILU_GEMV", True)
    calls = [count_calls(monkeypatch, module, "gemv_silu_mul_triton") for module in (quant, fp8_model)]
    got = run()
    assert sum(c[0] for c in calls)  # the decode steps (batch 1: the GEMVs) took the fused kernel
    assert_close_greedy(want, got, f"fused gate_up + silu_and_mul ({quantization or 'bf16'})")
