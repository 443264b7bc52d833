"""GPU (`pytest -m gpu`): the row-parallel GEMV with the residual add and RMSNorm in its epilogue
(kernels/gemv_add_norm.py) at real shapes against the two Triton kernels it replaces (the GEMV with the
same tiles, then the norm kernel): bf16 Llama-3.1-8B o_proj and down_proj at M = 1, FP8 Llama-3.2-1B
at M = 1 and 2; bitwise the same over repeated launches and CUDA graph replays (the tickets reset, the
statistic summed in a fixed order); and an engine with it (decode CUDA graphs, bf16 and FP8 weights)
against one without, by vLLM's logprobs-close rule."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from agentserve import SamplingParams  # noqa: E402
from agentserve.kernels import fp8_linear, gemv, gemv_add_norm, rmsnorm  # noqa: E402
from agentserve.kernels._triton_utils import num_sms  # noqa: E402
from agentserve.llm import LLM  # noqa: E402
from agentserve.model import add_norm, fp8 as fp8_model, quant  # noqa: E402
from agentserve.testing import tiny_model_cached  # noqa: E402
from helpers.calls import count_calls  # noqa: E402
from helpers.gpu_kernels import DEV, GPU_SKIPS  # noqa: E402
from helpers.logprobs_close import assert_close_greedy, greedy_result  # noqa: E402

pytestmark = [pytest.mark.gpu, *GPU_SKIPS]


def _row_inputs(m: int, n: int, dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(m, n, device=DEV, dtype=dtype), (1 + 0.1 * torch.randn(n, device=DEV)).to(dtype)


@pytest.mark.parametrize("k,n", [(4096, 4096), (14336, 4096)], ids=["o_proj", "down_proj"])
def test_bf16_matches_gemv_then_add_norm(k: int, n: int) -> None:
    x = torch.randn(1, k, device=DEV, dtype=torch.bfloat16)
    weight = (torch.randn(n, k, device=DEV) / k ** 0.5).to(torch.bfloat16)
    residual, norm_weight = _row_inputs(1, n)
    config = gemv.gemv_config(1, n, k, num_sms(x.device))
    workspace = gemv_add_norm.AddNormWorkspace(n, x.device)
    out, new_res = gemv_add_norm.gemv_add_rms_norm_triton(x, weight, config, residual, norm_weight, 1e-5, workspace)
    want_out, want_res = rmsnorm.rms_norm_triton(gemv.gemv_triton(x, weight, config=config), norm_weight, 1e-5,
                                                 residual)
    # The same tiles and rounding steps: the residual stream is bitwise the two-step one; the normalised
    # row differs only by the statistic's fp32 summation order.
    assert torch.equal(new_res, want_res)
    torch.testing.assert_close(out.float(), want_out.float(), atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("k", [2048, 8192], ids=["o_proj", "down_proj"])
def test_fp8_matches_fp8_gemv_then_add_norm(m: int, k: int) -> None:
    n = 2048  # Llama-3.2-1B's hidden size: the FP8 draft's o_proj and down_proj outputs
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    weight_q, scale = fp8_linear.quantize_weight_per_channel(torch.randn(n, k, device=DEV) / k ** 0.5)
    residual, norm_weight = _row_inputs(m, n)
    config = fp8_linear.fp8_gemv_config(n, k, num_sms(x.device))
    workspace = gemv_add_norm.AddNormWorkspace(n, x.device)
    out, new_res = gemv_add_norm.gemv_add_rms_norm_triton(x, weight_q, config, residual, norm_weight, 1e-5,
                                                          workspace, weight_scale=scale)
    want_out, want_res = rmsnorm.rms_norm_triton(fp8_linear.fp8_gemv_triton(x, weight_q, scale, config=config),
                                                 norm_weight, 1e-5, residual)
    assert torch.equal(new_res, want_res)
    torch.testing.assert_close(out.float(), want_out.float(), atol=2e-2, rtol=1e-2)


def test_deterministic_over_launches_and_graph_replays() -> None:
    """Many launches on one workspace, eager and replayed from a CUDA graph, give bitwise one result: a
    ticket left non-zero would skip a row's normalisation (stale output), a racy read of the partials
    would change the statistic."""
    k, n = 14336, 4096
    x = torch.randn(1, k, device=DEV, dtype=torch.bfloat16)
    weight = (torch.randn(n, k, device=DEV) / k ** 0.5).to(torch.bfloat16)
    residual, norm_weight = _row_inputs(1, n)
    config = gemv.gemv_config(1, n, k, num_sms(x.device))
    workspace = gemv_add_norm.AddNormWorkspace(n, x.device)

    def launch() -> tuple[torch.Tensor, torch.Tensor]:
        return gemv_add_norm.gemv_add_rms_norm_triton(x, weight, config, residual, norm_weight, 1e-5, workspace)

    first = launch()
    for _ in range(20):
        again = launch()
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        launch()  # warm-up on the capture stream
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = launch()
    for i in range(30):
        if i % 10 == 9:
            x.copy_(torch.randn_like(x))
        graph.replay()
        want = launch()
        torch.cuda.synchronize()
        assert torch.equal(captured[0], want[0]) and torch.equal(captured[1], want[1]), i
    assert workspace.tickets.eq(0).all()


@pytest.mark.parametrize("quantization", [None, "fp8"])
def test_engine_with_the_fused_add_norm_is_logprobs_close(monkeypatch: pytest.MonkeyPatch,
                                                          quantization: str | None) -> None:
    prompts = [[5 + (7 * i + j) % 90 for j in range(20 + 9 * i)] for i in range(3)]
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, logprobs=5)

    def run() -> tuple[list[list[int]], list[list[dict[int, float]]]]:
        with LLM(str(tiny_model_cached("llama3")), device="cuda", dtype="bfloat16", max_num_seqs=2,
                 max_model_len=1024, gpu_memory_utilization=0.3, quantization=quantization) as llm:
            return greedy_result(llm.generate(prompts, params))

    monkeypatch.setattr(add_norm, "FUSED_ADD_NORM_GEMV", False)
    want = run()
    monkeypatch.setattr(add_norm, "FUSED_ADD_NORM_GEMV", True)
    calls = [count_calls(monkeypatch, module, "gemv_add_rms_norm_triton") for module in (quant, fp8_model)]
    got = run()
    assert sum(c[0] for c in calls)  # the decode steps (the GEMV's batch sizes) took the fused kernel
    assert_close_greedy(want, got, f"fused o_proj / down_proj + add + RMSNorm ({quantization or 'bf16'})")
