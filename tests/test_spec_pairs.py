"""Target / draft pairs the engine has not been tuned on (issue #12): drafts that differ from the target
in shape — layers, hidden size, KV heads, head_dim, attention heads, tied or untied embeddings,
another architecture family with the same tokenizer, qk-norm, rope scaling, a shorter context — all
keep the target's greedy tokens exactly (fp32, CPU). Drafts that are the target in another form
(tests/helpers/spec_pairs.py) must also have every proposal accepted, which checks that the draft's
own forward ran right. A draft that cannot serve (another vocabulary, a missing path) is refused at
start-up with a ModelLoadError naming draft_model; a GGUF draft serves as its directory does."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from typing import Callable

import pytest

from agentserve import SamplingParams
from agentserve.llm import LLM
from agentserve.model.arch_config import ModelLoadError
from agentserve.testing import tiny_model_cached
from helpers.gguf_checkpoints import write_gguf
from helpers.spec_models import greedy_token_ids
from helpers.spec_pairs import (foreign_family_draft, llama_copy_of_qwen2, mistral_copy_of_llama, more_kv_heads_copy,
                                rope_scaled_draft, shaped_draft, short_context_copy, sliding_window_draft,
                                untied_copy)

# Repetitive and plain prompts; the longest (40 tokens) runs past the short-context draft's 16 positions.
PROMPTS = [[5, 6, 7, 8, 9, 10, 5, 6, 7, 8], [11, 12, 13, 14, 15, 16, 17], [(7 * i) % 90 + 20 for i in range(40)]]
PARAMS = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
ENGINE = dict(device="cpu", dtype="float32", block_size=4, num_blocks=96)

# name -> (target arch, the draft's directory)
RANDOM_DRAFTS: dict[str, tuple[str, Callable[[], str]]] = {
    "fewer_layers": ("qwen2", lambda: shaped_draft("qwen2", num_layers=1)),
    "more_layers": ("qwen2", lambda: shaped_draft("qwen2", num_layers=3)),
    "wider_hidden": ("qwen2", lambda: shaped_draft("qwen2", hidden_size=96, num_heads=6, num_kv_heads=2)),
    "more_kv_heads": ("qwen2", lambda: shaped_draft("qwen2", num_kv_heads=4)),
    "fewer_kv_heads": ("llama", lambda: shaped_draft("llama", num_kv_heads=1)),
    "other_head_dim": ("llama", lambda: shaped_draft("llama", head_dim=32)),
    "more_attention_heads": ("llama", lambda: shaped_draft("llama", num_heads=8, num_kv_heads=2)),
    "tied_under_untied": ("llama", lambda: shaped_draft("llama", tie_word_embeddings=True)),
    "untied_under_tied": ("qwen2", lambda: shaped_draft("qwen2", tie_word_embeddings=False)),
    "llama_family_for_qwen2": ("qwen2", lambda: foreign_family_draft("qwen2", "llama")),
    "qk_norm_for_qwen2": ("qwen2", lambda: foreign_family_draft("qwen2", "qwen3")),
    "qwen2_family_for_qwen3": ("qwen3", lambda: foreign_family_draft("qwen3", "qwen2")),
    "unscaled_for_llama3": ("llama3", lambda: foreign_family_draft("llama3", "llama")),
    "linear_rope": ("llama", lambda: rope_scaled_draft("llama", "linear", 4.0)),
    "yarn_rope": ("mistral", lambda: rope_scaled_draft("mistral", "yarn", 4.0)),
    "short_context": ("llama", lambda: shaped_draft("llama", max_position_embeddings=16)),
    "sliding_window": ("mistral", lambda: sliding_window_draft("mistral", 8)),
}
EQUIVALENT_DRAFTS: dict[str, tuple[str, Callable[[], str]]] = {
    "untied_copy": ("qwen2", lambda: untied_copy("qwen2")),
    "llama_copy_of_qwen2": ("qwen2", llama_copy_of_qwen2),
    "mistral_copy_of_llama": ("llama", mistral_copy_of_llama),
    "mha_copy": ("qwen3", lambda: more_kv_heads_copy("qwen3")),
    "short_context_copy": ("llama", lambda: short_context_copy("llama", 16)),
}


@functools.lru_cache(maxsize=None)
def plain(arch: str) -> list[list[int]]:
    return greedy_token_ids(str(tiny_model_cached(arch)), PROMPTS, PARAMS, **ENGINE)


def speculate(arch: str, draft: str, k: int = 3) -> tuple[list[list[int]], int, int]:
    """(greedy tokens, drafts proposed, drafts accepted) with `draft` proposing k tokens a step."""
    llm = LLM(str(tiny_model_cached(arch)), draft_model=draft, num_speculative_tokens=k, spec_dynamic=False, **ENGINE)
    out = [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, PARAMS)]
    m = llm.engine.metrics
    llm.engine.pool.check_all_free()
    llm.close()
    return out, m.spec_num_draft_tokens, m.spec_num_accepted_tokens


@pytest.mark.parametrize("name", list(RANDOM_DRAFTS))
def test_drafts_of_another_shape_keep_the_greedy_tokens(name: str) -> None:
    arch, make = RANDOM_DRAFTS[name]
    tokens, proposed, _ = speculate(arch, make())
    assert proposed > 0
    assert tokens == plain(arch)


@pytest.mark.parametrize("name", list(EQUIVALENT_DRAFTS))
def test_the_target_in_another_form_is_accepted_every_time(name: str) -> None:
    arch, make = EQUIVALENT_DRAFTS[name]
    tokens, proposed, accepted = speculate(arch, make(), k=4)
    assert tokens == plain(arch)
    assert proposed > 0 and accepted == proposed


def test_gguf_draft_without_tokenizer_metadata_serves_like_its_directory(tmp_path: Path) -> None:
    """A GGUF file holding only weights (no tokenizer.ggml.*): the draft's rows equal the target's, so it
    is accepted (as a directory without tokenizer files is), and it is the target itself: every
    proposal is accepted. It used to fail at start-up with "cannot load the tokenizer ...: 'tokens'"."""
    arch = "qwen2"
    draft = write_gguf(tiny_model_cached(arch), tmp_path / "draft.gguf", arch)
    tokens, proposed, accepted = speculate(arch, str(draft), k=4)
    assert tokens == plain(arch)
    assert proposed > 0 and accepted == proposed


def test_another_vocabulary_is_refused_naming_the_draft() -> None:
    other = str(tiny_model_cached("mistral"))
    with pytest.raises(ModelLoadError, match=r"draft_model .*mistral.* \(--draft-model\): the draft model's tokenizer "
                                             r"maps tokens to other ids"):
        LLM(str(tiny_model_cached("qwen2")), device="cpu", draft_model=other)


def test_a_missing_draft_is_refused_naming_the_draft() -> None:
    missing = str(Path(tempfile.gettempdir()) / "no-such-draft-model")
    with pytest.raises(ModelLoadError, match=r"draft_model '.*no-such-draft-model' \(--draft-model\): model path"):
        LLM(str(tiny_model_cached("qwen2")), device="cpu", draft_model=missing)
