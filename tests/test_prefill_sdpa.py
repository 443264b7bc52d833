"""The first-chunk prefill attention through scaled_dot_product_attention (model/prefill_sdpa.py,
on by default, AGENTSERVE_PREFILL_ATTENTION=paged turns it off): against the paged reference on scattered, NaN-poisoned pages
(a read outside the step's slots would show), with an fp8 cache, grouped-query heads; which steps
take it; and an engine run that takes it gives the paged path's greedy tokens. (On the GPU the
cuDNN / FlashAttention backends run it: tests/test_gpu_prefill_sdpa.py.)"""

from __future__ import annotations


import pytest
import torch

from agentserve import SamplingParams
from agentserve.kernels.fp8_utils import quantize_kv_ref
from agentserve.kernels.paged_attention import paged_attention_ref
from agentserve.llm import LLM
from agentserve.model import attention, prefill_sdpa
from agentserve.testing import tiny_model_cached
from helpers.calls import count_calls
from helpers.paged_batch import PagedBatch, random_paged_batch

SCALE = 0.125


def _slots(batch: PagedBatch, num_tokens: int, page: int) -> torch.Tensor:
    pos = torch.arange(num_tokens)
    return batch.block_tables[0, pos // page].long() * page + pos % page


@pytest.mark.parametrize("hq,hkv,page", [(4, 2, 16), (8, 8, 8), (6, 1, 32)])
def test_matches_the_paged_reference_on_scattered_pages(hq: int, hkv: int, page: int) -> None:
    tokens = 45
    batch = random_paged_batch([tokens], [0], hq, hkv, 32, page, torch.float32, seed=hq + page)
    out = prefill_sdpa.sdpa_prefill(batch.q, batch.k_cache, batch.v_cache, _slots(batch, tokens, page), SCALE)
    k, v = batch.clean_caches()
    ref = paged_attention_ref(batch.q, k, v, batch.block_tables, batch.query_start_loc, batch.seq_lens, SCALE,
                              batch.max_query_len, batch.max_seq_len)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_unwritten_slots_do_not_fault_and_leave_written_tokens_exact() -> None:
    # The KV-pool sizing forward runs one long prompt whose slots are all -1 (no KV writes): the
    # gather must not index out of bounds (on the GPU that was a device-side assert that poisoned the
    # process). Tokens after a -1 slot see a garbage key there, so only the output shape and the
    # tokens before the first unwritten one are checked against the reference.
    tokens, page = 20, 16
    batch = random_paged_batch([tokens], [0], 4, 2, 32, page, torch.float32, seed=7)
    slots = _slots(batch, tokens, page)
    all_unwritten = prefill_sdpa.sdpa_prefill(batch.q, batch.k_cache, batch.v_cache, torch.full_like(slots, -1),
                                              SCALE)
    assert all_unwritten.shape == batch.q.shape
    slots[12:] = -1
    out = prefill_sdpa.sdpa_prefill(batch.q, batch.k_cache, batch.v_cache, slots, SCALE)
    full = prefill_sdpa.sdpa_prefill(batch.q, batch.k_cache, batch.v_cache, _slots(batch, tokens, page), SCALE)
    torch.testing.assert_close(out[:12], full[:12])


def test_fp8_pages_are_dequantized_with_the_layer_scales() -> None:
    tokens, page = 33, 16
    batch = random_paged_batch([tokens], [0], 4, 2, 32, page, torch.float32, poison=False, seed=7)
    k_scale, v_scale = torch.tensor([0.02]), torch.tensor([0.015])
    k8, v8 = quantize_kv_ref(batch.k_cache, k_scale), quantize_kv_ref(batch.v_cache, v_scale)
    out = prefill_sdpa.sdpa_prefill(batch.q, k8, v8, _slots(batch, tokens, page), SCALE, k_scale, v_scale)
    ref = paged_attention_ref(batch.q, k8, v8, batch.block_tables, batch.query_start_loc, batch.seq_lens, SCALE,
                              batch.max_query_len, batch.max_seq_len, k_scale, v_scale)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_only_a_long_first_chunk_of_one_sequence_takes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    n = prefill_sdpa.SDPA_MIN_TOKENS
    monkeypatch.setattr(prefill_sdpa, "PREFILL_SDPA", False)
    assert not prefill_sdpa.use_sdpa_prefill(n, 1, n, n)  # AGENTSERVE_PREFILL_ATTENTION=paged
    monkeypatch.setattr(prefill_sdpa, "PREFILL_SDPA", True)
    assert prefill_sdpa.use_sdpa_prefill(n, 1, n, n)
    assert not prefill_sdpa.use_sdpa_prefill(n, 1, n, n + 100)  # cached context before the chunk
    assert not prefill_sdpa.use_sdpa_prefill(n, 2, n - 10, n - 10)  # two sequences
    assert not prefill_sdpa.use_sdpa_prefill(n - 1, 1, n - 1, n - 1)  # short: the paged kernel
    assert not prefill_sdpa.use_sdpa_prefill(1, 1, 1, 1)  # never a decode step


def _generate(prompts: list[list[int]]) -> list[list[int]]:
    # One sequence per step, so the long prompt's first chunk runs alone (the path's condition).
    with LLM(str(tiny_model_cached("llama3")), dtype="float32", max_num_seqs=1, max_model_len=512,
             max_num_batched_tokens=512) as llm:
        outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
        return [list(o.outputs[0].token_ids) for o in outs]


def test_engine_greedy_tokens_match_the_paged_path(monkeypatch: pytest.MonkeyPatch) -> None:
    prompts = [[(i * 37 + 11) % 200 + 3 for i in range(300)], [(i * 53 + 5) % 190 + 7 for i in range(40)]]
    monkeypatch.setattr(prefill_sdpa, "PREFILL_SDPA", False)
    paged = _generate(prompts)
    monkeypatch.setattr(prefill_sdpa, "PREFILL_SDPA", True)
    monkeypatch.setattr(prefill_sdpa, "SDPA_MIN_TOKENS", 64)
    calls = count_calls(monkeypatch, attention, "sdpa_prefill")
    assert _generate(prompts) == paged
    assert calls[0] > 0  # the 300-token prompt's first chunk, in every layer
