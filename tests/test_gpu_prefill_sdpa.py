"""GPU (`pytest -m gpu`): the first-chunk prefill attention through scaled_dot_product_attention
(model/prefill_sdpa.py; cuDNN or FlashAttention on an H200) against the Triton paged kernel at
Llama-3.1-8B's head shapes on scattered bf16 pages, and an engine run that takes it against one
that does not (vLLM's logprobs-close rule)."""

from __future__ import annotations

import os
from typing import Any

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from agentserve import SamplingParams  # noqa: E402
from agentserve.kernels import paged_attention as pa  # noqa: E402
from agentserve.llm import LLM  # noqa: E402
from agentserve.model import attention, prefill_sdpa  # noqa: E402
from agentserve.testing import tiny_model_cached  # noqa: E402
from helpers.calls import count_calls  # noqa: E402
from helpers.gpu_kernels import DEV, GPU_SKIPS, TOL16  # noqa: E402
from helpers.logprobs_close import assert_close_greedy, greedy_result  # noqa: E402
from helpers.paged_batch import random_paged_batch  # noqa: E402

pytestmark = [pytest.mark.gpu, *GPU_SKIPS]


@pytest.mark.parametrize("tokens", [1024, 4099])
def test_matches_the_triton_paged_kernel_at_8b_head_shapes(tokens: int) -> None:
    page = 16
    batch = random_paged_batch([tokens], [0], 32, 8, 128, page, torch.bfloat16, DEV, seed=tokens)
    pos = torch.arange(tokens, device=DEV)
    slots = batch.block_tables[0, pos // page].long() * page + pos % page
    out = prefill_sdpa.sdpa_prefill(batch.q, batch.k_cache, batch.v_cache, slots, 128 ** -0.5)
    ref = pa.paged_attention_triton(*batch.args(), 128 ** -0.5, batch.max_query_len, batch.max_seq_len)
    assert not out.isnan().any()
    torch.testing.assert_close(out.float(), ref.float(), **TOL16)


@pytest.mark.parametrize("fp8", [False, True])
def test_pages_to_query_heads_gather_at_8b_shapes(fp8: bool) -> None:
    """kernels/kv_gather.py at an 8,192-token prompt (32 query / 8 kv heads of 128) against the
    index_select + repeat_interleave it replaces, bf16 and fp8 pages."""
    from agentserve.kernels.fp8_utils import quantize_kv_ref
    from agentserve.kernels.kv_gather import gather_expand_triton

    tokens, page = 8192, 16
    g = torch.Generator(device=DEV).manual_seed(3)
    k_cache = torch.randn(tokens // page + 8, page, 8, 128, device=DEV, generator=g, dtype=torch.bfloat16)
    v_cache = torch.randn(tokens // page + 8, page, 8, 128, device=DEV, generator=g, dtype=torch.bfloat16)
    scales: tuple[Any, Any] = (None, None)
    if fp8:
        scales = (torch.tensor([0.02], device=DEV), torch.tensor([0.015], device=DEV))
        k_cache, v_cache = quantize_kv_ref(k_cache, scales[0]), quantize_kv_ref(v_cache, scales[1])
    slots = torch.randperm(k_cache.shape[0] * page, device=DEV, generator=g)[:tokens]
    k, v = gather_expand_triton(k_cache, v_cache, slots, 32, torch.bfloat16, *scales)
    for got, cache, scale in ((k, k_cache, scales[0]), (v, v_cache, scales[1])):
        want = prefill_sdpa._gather(cache, slots, scale, torch.bfloat16).transpose(0, 1).repeat_interleave(4, dim=0)
        assert torch.equal(got, want)


def _run(prompts: list[list[int]]) -> Any:
    with LLM(str(tiny_model_cached("llama3")), device="cuda", dtype="bfloat16", max_num_seqs=1, max_model_len=2048,
             gpu_memory_utilization=0.3) as llm:
        outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=5))
        return greedy_result(outs)


def test_engine_logprobs_close_with_and_without(monkeypatch: pytest.MonkeyPatch) -> None:
    prompts = [[(i * 37 + 11) % 200 + 3 for i in range(1500)], [(i * 53 + 5) % 190 + 7 for i in range(1100)]]
    monkeypatch.setattr(prefill_sdpa, "PREFILL_SDPA", False)
    paged = _run(prompts)
    monkeypatch.setattr(prefill_sdpa, "PREFILL_SDPA", True)
    calls = count_calls(monkeypatch, attention, "sdpa_prefill")
    sdpa = _run(prompts)
    assert calls[0] > 0
    assert_close_greedy(paged, sdpa, "prefill attention: sdpa vs paged")
