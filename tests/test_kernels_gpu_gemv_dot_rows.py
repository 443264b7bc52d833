"""GPU (`pytest -m gpu`): the GEMV kernels for a few rows (kernels/gemv.py with AGENTSERVE_GEMV_DOT_ROWS=1:
"fma" at M = 2, "dot" at 3..8, the batch-1 verification's k + 1 rows) at Llama-3.1-8B's projection
shapes against F.linear, inside a CUDA graph, with the default and an overridden dot tile; and an engine
with them on (verification) against one with them off, by vLLM's logprobs-close rule."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from agentserve import SamplingParams  # noqa: E402
from agentserve.kernels import gemv  # noqa: E402
from agentserve.llm import LLM  # noqa: E402
from agentserve.testing import tiny_model_cached  # noqa: E402
from helpers.gpu_kernels import DEV, GPU_SKIPS  # noqa: E402
from helpers.logprobs_close import assert_close_greedy, greedy_result  # noqa: E402

pytestmark = [pytest.mark.gpu, *GPU_SKIPS]


@pytest.mark.parametrize("k,n", [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)],
                         ids=["qkv", "o", "gate_up", "down"])
@pytest.mark.parametrize("m", [2, 5, 8])
def test_matches_linear(k: int, n: int, m: int) -> None:
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    weight = (torch.randn(n, k, device=DEV) / k ** 0.5).to(torch.bfloat16)
    want = F.linear(x.float(), weight.float())
    out = gemv.gemv_triton(x, weight)
    torch.testing.assert_close(out.float(), want, atol=2e-2, rtol=1e-2)
    tile = gemv.parse_dot_tile("16,256,4,6")
    torch.testing.assert_close(gemv.gemv_triton(x, weight, config=tile).float(), want, atol=2e-2, rtol=1e-2)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = gemv.gemv_triton(x, weight)
    x.copy_(torch.randn(m, k, device=DEV, dtype=torch.bfloat16))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured.float(), F.linear(x.float(), weight.float()), atol=2e-2, rtol=1e-2)


def test_engine_with_the_dot_rows_is_logprobs_close(monkeypatch: pytest.MonkeyPatch) -> None:
    prompts = [[5 + (7 * i + j) % 90 for j in range(20 + 9 * i)] for i in range(5)]
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, logprobs=5)
    path = str(tiny_model_cached("llama3"))

    def run() -> tuple[list[list[int]], list[list[dict[int, float]]]]:
        with LLM(path, device="cuda", dtype="bfloat16", max_num_seqs=1, max_model_len=1024,
                 gpu_memory_utilization=0.3, draft_model=path, num_speculative_tokens=4, spec_dynamic=False) as llm:
            return greedy_result(llm.generate(prompts, params))

    monkeypatch.setattr(gemv, "DOT_ROWS", False)
    want = run()
    calls = []
    kernel = gemv.gemv_triton

    def counted(x: torch.Tensor, *args: object, **kwargs: object) -> object:
        calls.append(x.numel() // x.shape[-1])
        return kernel(x, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(gemv, "DOT_ROWS", True)
    monkeypatch.setattr(gemv, "gemv_triton", counted)
    got = run()
    assert 5 in calls  # the verification (1 row x k + 1 = 5 tokens) took the dot kernel
    assert_close_greedy(want, got, "Triton GEMV for a few rows")
