"""GPU (`pytest -m gpu`): the two-row GEMVs (kernels/gemv_pair.py) at the FP8 Llama-3.2-1B draft's shapes
(the 2-token catch-up of every speculative continuation) against the one-row kernels at M == 2, fresh
random inputs; and the FP8 target as its own draft through CUDA graphs with them on, by vLLM's
logprobs-close rule against the same engine with them off."""

from __future__ import annotations

import os
from typing import Iterator

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from agentserve import SamplingParams  # noqa: E402
from agentserve.kernels import fp8_linear, gemv_pair, gemv_silu  # noqa: E402
from agentserve.kernels._triton_utils import num_sms  # noqa: E402
from agentserve.llm import LLM  # noqa: E402
from agentserve.testing import tiny_model_cached  # noqa: E402
from helpers.gpu_kernels import DEV, GPU_SKIPS  # noqa: E402
from helpers.logprobs_close import assert_close_greedy, greedy_result  # noqa: E402

pytestmark = [pytest.mark.gpu, *GPU_SKIPS]


@pytest.fixture
def restore_pair_rows() -> Iterator[None]:
    before = gemv_pair.PAIR_ROWS
    yield
    gemv_pair.set_pair_rows(before)


@pytest.mark.parametrize("k,n", [(2048, 3072), (2048, 2048), (8192, 2048), (2048, 128256)],
                         ids=["qkv", "o", "down", "lm_head"])
def test_fp8_pair_matches_the_one_row_kernel(restore_pair_rows: None, k: int, n: int) -> None:
    x = torch.randn(2, k, device=DEV, dtype=torch.bfloat16)
    weight_q, scale = fp8_linear.quantize_weight_per_channel(torch.randn(n, k, device=DEV) / k ** 0.5)
    gemv_pair.set_pair_rows(True)
    pair = fp8_linear.fp8_gemv_triton(x, weight_q, scale)
    gemv_pair.set_pair_rows(False)
    one_row = fp8_linear.fp8_gemv_triton(x, weight_q, scale)
    torch.testing.assert_close(pair.float(), one_row.float(), atol=2e-2, rtol=1e-2)


def test_fp8_silu_pair_matches_the_one_row_kernel(restore_pair_rows: None) -> None:
    k, n = 2048, 16384  # the 1B draft's gate_up
    x = torch.randn(2, k, device=DEV, dtype=torch.bfloat16)
    weight_q, scale = fp8_linear.quantize_weight_per_channel(torch.randn(n, k, device=DEV) / k ** 0.5)
    config = fp8_linear.fp8_gemv_config(n, k, num_sms(x.device))
    gemv_pair.set_pair_rows(True)
    pair = gemv_silu.gemv_silu_mul_triton(x, weight_q, config, weight_scale=scale)
    gemv_pair.set_pair_rows(False)
    one_row = gemv_silu.gemv_silu_mul_triton(x, weight_q, config, weight_scale=scale)
    torch.testing.assert_close(pair.float(), one_row.float(), atol=2e-2, rtol=1e-2)


def test_fp8_self_draft_with_pair_rows_through_graphs(restore_pair_rows: None) -> None:
    path = str(tiny_model_cached("llama"))
    prompts = [[5, 6, 7, 8, 9, 10, 11 + i, 12, 13] for i in range(4)]
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, logprobs=5)
    kw = dict(device="cuda", dtype="bfloat16", max_num_seqs=8, max_model_len=512, gpu_memory_utilization=0.3,
              draft_model=path, draft_quantization="fp8", spec_dynamic=False)
    results = []
    for on in (False, True):
        gemv_pair.set_pair_rows(on)  # before the engine: its graphs capture the kernels chosen now
        with LLM(path, **kw) as llm:
            results.append(greedy_result(llm.generate(prompts, params)))
            m = llm.engine.metrics
            assert m.spec_num_draft_tokens > 0 and m.spec_num_accepted_tokens / m.spec_num_draft_tokens > 0.5
    assert_close_greedy(results[0], results[1], "pair rows")
