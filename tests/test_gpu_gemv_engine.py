"""GPU: the engine with the Triton GEMV for its decode projections (AGENTSERVE_GEMV=triton) against
the default cuBLAS path, greedy bf16 on tiny models (llama; qwen2 for the qkv bias), CUDA graphs
on. Evidence for flipping the GEMV default. Run with `pytest -m gpu`."""

from __future__ import annotations

import pytest
import torch

from agentserve import SamplingParams
from agentserve.kernels import gemv
from agentserve.llm import LLM
from agentserve.testing import tiny_model_cached
from helpers.logprobs_close import greedy_result

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PROMPTS = ["The quick brown fox", "In a distant galaxy, a small robot named", "def fibonacci(n):"]
PARAMS = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=5)


def _generate(arch: str, mode: str) -> tuple[list[list[int]], list[list[dict[int, float]]]]:
    before = gemv.get_gemv_mode()
    gemv.set_gemv_mode(mode)
    try:
        llm = LLM(str(tiny_model_cached(arch)), device="cuda", dtype="bfloat16", max_num_seqs=4,
                  max_model_len=512, gpu_memory_utilization=0.2)
        outs = llm.generate(PROMPTS, PARAMS)
        del llm
        return greedy_result(outs)
    finally:
        gemv.set_gemv_mode(before)
        torch.cuda.empty_cache()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_triton_gemv_engine_matches_cublas(arch: str) -> None:
    ref, fast = _generate(arch, "torch"), _generate(arch, "triton")
    # Different fp32 summation orders round differently; where greedy sequences first split (a
    # near-tie), each token must be in the other's top-5 (vLLM's rule), as in test_gpu_engine.py.
    for i, (a_ids, b_ids) in enumerate(zip(ref[0], fast[0])):
        for pos, (a, b) in enumerate(zip(a_ids, b_ids)):
            if a != b:
                assert b in ref[1][i][pos] and a in fast[1][i][pos], f"{arch} prompt {i} diverged at {pos}"
                break
