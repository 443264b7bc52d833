"""Decode rows longest first in the unified attention kernel (agentserve.model.attention.with_decode_row_order,
AGENTSERVE_DECODE_ROW_ORDER): where the order is built, and on the GPU that the engine's tokens do not change
with it (the kernel's bitwise check is in tests/test_kernels_attention.py and test_kernels_gpu_attention.py)."""

from __future__ import annotations

import pytest
import torch

from agentserve import SamplingParams
from agentserve.llm import LLM
from agentserve.model import attention
from agentserve.model.attention import ForwardMetadata, with_decode_row_order
from agentserve.testing import tiny_model_cached


def _meta(rows: int, max_query_len: int, device: str = "cpu") -> ForwardMetadata:
    seq_lens = torch.randint(1, 500, (rows,), generator=torch.Generator().manual_seed(rows)).to(torch.int32)
    return ForwardMetadata(slot_mapping=torch.zeros(rows, dtype=torch.int64, device=device),
                           block_tables=torch.zeros(rows, 32, dtype=torch.int32, device=device),
                           query_start_loc=torch.arange(rows + 1, dtype=torch.int32, device=device),
                           seq_lens=seq_lens.to(device), max_query_len=max_query_len, max_seq_len=500)


def test_order_only_for_large_decode_batches_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attention, "DECODE_ROW_ORDER", True)
    # The CPU reference path does not take an order, prefill / mixed steps and small batches get none.
    for meta in (_meta(128, 1), _meta(128, 3), _meta(attention.DECODE_ROW_ORDER_MIN_ROWS - 1, 1)):
        assert with_decode_row_order(meta) is meta
    monkeypatch.setattr(attention, "DECODE_ROW_ORDER", False)
    assert with_decode_row_order(_meta(128, 1)).decode_row_order is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_engine_tokens_equal_with_and_without_the_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attention, "DECODE_ROW_ORDER", True)
    meta = with_decode_row_order(_meta(128, 1, "cuda"))
    order = meta.decode_row_order
    assert order is not None and order.dtype == torch.int32
    assert sorted(order.tolist()) == list(range(128))
    lens = meta.seq_lens[order.long()]
    assert bool((lens[:-1] >= lens[1:]).all())  # longest first

    # 80 prompts of 3-92 tokens: decode steps of up to 80 rows over uneven contexts (graph sizes >= 64 take the order)
    prompts = [{"prompt_token_ids": [(7 * i + j) % 200 + 5 for j in range(3 + (i * 37) % 90)]} for i in range(80)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    outs = {}
    for on in (False, True):
        monkeypatch.setattr(attention, "DECODE_ROW_ORDER", on)
        llm = LLM(str(tiny_model_cached("llama3")), device="cuda", dtype="bfloat16", max_num_seqs=96,
                  max_model_len=512, gpu_memory_utilization=0.3)
        assert llm.engine.runner.graphs is not None  # the decode graphs carry the order
        outs[on] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        del llm
        torch.cuda.empty_cache()
    assert outs[True] == outs[False]
