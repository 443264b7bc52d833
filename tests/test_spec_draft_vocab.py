"""A draft whose embedding table is padded to another size than the target's (one tokenizer, as in
Qwen2.5-0.5B under Qwen2.5-7B): accepted at start-up, proposes on the target's ids (the target as its
own draft under another padding is accepted every time), greedy outputs identical to no speculation,
and ids past the draft's rows never index out of bounds. Mismatches that are real stay refused."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from agentserve import SamplingParams
from agentserve.llm import LLM
from agentserve.model.arch_config import ArchConfig, ModelLoadError
from agentserve.model.embedding import ParallelLMHead, VocabParallelEmbedding
from agentserve.spec.draft_vocab import check_draft_vocabulary
from agentserve.testing import ARCHS, tiny_model_cached
from helpers.spec_models import greedy_token_ids, repadded_draft

PROMPTS = [[5, 6, 7, 8, 9, 10, 5, 6, 7, 8], [11, 12, 13, 14, 15, 16, 17], [20, 21, 22, 20, 21]]
PARAMS = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
ENGINE = dict(device="cpu", dtype="float32", block_size=4, num_blocks=64)


def vocab_sizes(arch: str) -> tuple[int, int, int]:
    """(the tokenizer's id count, the target's rows, another padding's rows)."""
    path = tiny_model_cached(arch)
    num_ids = max(AutoTokenizer.from_pretrained(path).get_vocab().values()) + 1
    return num_ids, ArchConfig.from_dir(path).vocab_size, ArchConfig.from_dir(path).vocab_size + 128


@functools.lru_cache(maxsize=None)
def plain(arch: str) -> list[list[int]]:
    return greedy_token_ids(str(tiny_model_cached(arch)), PROMPTS, PARAMS, **ENGINE)


@pytest.mark.parametrize("padding", ["fewer_rows", "more_rows"])
@pytest.mark.parametrize("arch", ARCHS)
def test_target_as_its_own_draft_under_another_padding(arch: str, padding: str) -> None:
    num_ids, target_rows, more_rows = vocab_sizes(arch)
    draft_rows = num_ids if padding == "fewer_rows" else more_rows
    assert draft_rows != target_rows
    llm = LLM(str(tiny_model_cached(arch)), draft_model=repadded_draft(arch, draft_rows),
              num_speculative_tokens=3, spec_dynamic=False, **ENGINE)
    got = [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, PARAMS)]
    assert got == plain(arch)
    m = llm.engine.metrics
    assert m.spec_num_draft_tokens > 0
    assert m.spec_num_accepted_tokens == m.spec_num_draft_tokens  # the ids line up
    llm.engine.pool.check_all_free()
    llm.close()


def test_random_sampling_with_a_draft_of_fewer_rows_is_seeded_and_in_range() -> None:
    arch = "qwen2"
    num_ids, target_rows, _ = vocab_sizes(arch)
    llm = LLM(str(tiny_model_cached(arch)), draft_model=repadded_draft(arch, num_ids), num_speculative_tokens=3,
              spec_dynamic=False, **ENGINE)
    params = SamplingParams(temperature=1.0, max_tokens=24, ignore_eos=True, seed=11)
    first = [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, params)]
    again = [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, params)]
    assert first == again
    assert all(0 <= t < target_rows for out in first for t in out)
    assert llm.engine.metrics.spec_num_accepted_tokens > 0
    llm.close()


def test_ids_past_a_drafts_rows_are_looked_up_in_its_last_row() -> None:
    emb = VocabParallelEmbedding(8, 4)
    emb.weight.data.copy_(torch.arange(32, dtype=torch.float32).view(8, 4))
    emb.max_id = 7
    out = emb(torch.tensor([3, 7, 9, 200]))
    assert torch.equal(out[2], emb.weight.data[7]) and torch.equal(out[3], emb.weight.data[7])
    assert torch.equal(out[0], emb.weight.data[3])


def test_lm_head_logits_cut_or_padded_with_minus_inf() -> None:
    head = ParallelLMHead(8, 4)
    head.weight.data.copy_(torch.randn(8, 4))
    hidden = torch.randn(2, 4)
    full = head.compute_logits(hidden)
    head.num_logits = 11
    wide = head.compute_logits(hidden)
    assert wide.shape == (2, 11) and torch.equal(wide[:, :8], full)
    assert torch.isneginf(wide[:, 8:]).all()
    head.num_logits = 6
    assert torch.equal(head.compute_logits(hidden), full[:, :6])


def test_real_mismatches_are_refused() -> None:
    qwen = tiny_model_cached("qwen2")
    target = ArchConfig.from_dir(qwen)
    tok = AutoTokenizer.from_pretrained(qwen)
    num_ids = max(tok.get_vocab().values()) + 1
    short = ArchConfig.from_dir(qwen)
    short.vocab_size = num_ids - 1
    with pytest.raises(ModelLoadError, match=f"draft model's embedding has {num_ids - 1} rows"):
        check_draft_vocabulary(target, short, tok, tok)
    with pytest.raises(ModelLoadError, match="no tokenizer"):
        check_draft_vocabulary(target, ArchConfig.from_dir(Path(repadded_draft("qwen2", target.vocab_size + 64))), None, None)
    other = AutoTokenizer.from_pretrained(tiny_model_cached("mistral"))
    with pytest.raises(ModelLoadError, match="other ids"):
        check_draft_vocabulary(target, target, tok, other)
    check_draft_vocabulary(target, ArchConfig.from_dir(Path(repadded_draft("qwen2", num_ids))), tok, tok)  # accepted
