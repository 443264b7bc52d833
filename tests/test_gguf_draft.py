"""GGUF models in speculative decoding: llama.cpp's converter lists every id up to the embedding's
rows in the file's tokenizer, naming the ids past the Hugging Face tokenizer's "[PAD<id>]"
(convert_hf_to_gguf.py's get_vocab_base), so a GGUF's vocabulary holds placeholders its Hugging
Face directory's lacks, and two GGUFs of one family padded to other sizes hold different ones. Such
a draft is the same vocabulary: accepted, every proposal of the target as its own draft accepted,
greedy outputs identical to no speculation. A draft with another tokenizer stays refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentserve import SamplingParams
from agentserve.llm import LLM
from agentserve.model.arch_config import ArchConfig, ModelLoadError
from agentserve.testing import tiny_model_cached
from helpers.gguf_checkpoints import write_gguf
from helpers.spec_models import repadded_draft

pytest.importorskip("gguf")

PROMPTS = ["The quick brown fox", "In a distant galaxy, a small robot named"]
PARAMS = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
ENGINE = dict(num_blocks=64, num_speculative_tokens=3, spec_dynamic=False)


def _tokens(llm: LLM) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, PARAMS)]


def test_gguf_drafts_share_the_vocabulary_of_their_hugging_face_and_repadded_twins(tmp_path: Path) -> None:
    src = tiny_model_cached("qwen2")
    target_gguf = write_gguf(src, tmp_path / "target.gguf", "qwen2", tokenizer_pre="qwen2")
    more_rows = ArchConfig.from_dir(src).vocab_size + 128
    draft_gguf = write_gguf(Path(repadded_draft("qwen2", more_rows)), tmp_path / "draft.gguf", "qwen2",
                            tokenizer_pre="qwen2")
    with LLM(str(src), num_blocks=64) as plain:
        want = _tokens(plain)
    for target, draft in ((src, target_gguf), (target_gguf, src), (target_gguf, draft_gguf)):
        with LLM(str(target), draft_model=str(draft), **ENGINE) as llm:
            assert _tokens(llm) == want, (target.name, draft.name)
            m = llm.engine.metrics
            assert m.spec_num_draft_tokens > 0 and m.spec_num_accepted_tokens == m.spec_num_draft_tokens


def test_a_gguf_draft_with_another_tokenizer_is_refused(tmp_path: Path) -> None:
    other = write_gguf(tiny_model_cached("llama3"), tmp_path / "llama3.gguf", "llama", tokenizer_pre="llama-bpe")
    with pytest.raises(ModelLoadError, match="maps tokens to other ids than the target's"):
        LLM(str(tiny_model_cached("qwen2")), draft_model=str(other), **ENGINE)
