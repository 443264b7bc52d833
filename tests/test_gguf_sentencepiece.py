"""GGUF files with a sentencepiece vocabulary (`tokenizer.ggml.model` "llama": Llama 2 and Mistral
v0.1-v0.3 GGUFs; pieces with `▁` word marks, byte-fallback pieces, scores, no merges), built here
without the sentencepiece package from a tokenizer trained the sentencepiece way
(helpers/spm_tokenizer.py):

- the engine builds the tokenizer from the file alone: plain text tokenizes as the source tokenizer
  does, any text (emoji, CJK, control characters: byte-fallback pieces) decodes back to itself, one
  BOS leads every prompt, `</s>` is an EOS of the engine;
- a chat renders the file's own template to the same text as the source directory, starts with one
  BOS, and the engine serves it with the greedy tokens of the same weights loaded from the directory.

Known and left as transformers does it (the reference the issue names: transformers loading the same
file): transformers rebuilds such a vocabulary with a non-legacy `Metaspace` pre-tokenizer, so text
that starts with a space, or text right after a special token (`<s>[INST]`), gets one `▁` fewer than
Llama 2's tokenizer.json and llama.cpp give it."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentserve import SamplingParams
from agentserve.llm import LLM
from agentserve.testing import tiny_model_cached
from helpers.gguf_checkpoints import write_gguf
from helpers.spm_tokenizer import with_sentencepiece_tokenizer

pytest.importorskip("gguf")

PLAIN = ["Hello world", "two  spaces and\ttabs", "def f():\n    return 1", "a", "x\n\n  y"]
ANY_TEXT = ["ünïcødé 😀 日本語", "\x01\x7f control", "¿Qué? — «ok»", "tab\tnew\nline"]


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the source directory with a sentencepiece-style tokenizer, its GGUF file with a llama vocabulary)."""
    root = tmp_path_factory.mktemp("spm")
    src = with_sentencepiece_tokenizer(tiny_model_cached("mistral"), root / "src")
    return src, write_gguf(src, root / "model.gguf", "llama", tokenizer_pre="sentencepiece")


def test_the_files_tokenizer_encodes_and_decodes_like_its_source(spm_model: tuple[Path, Path]) -> None:
    src, file = spm_model
    with LLM(str(file), num_blocks=32) as from_gguf, LLM(str(src), num_blocks=32) as ref:
        mine, theirs = from_gguf.get_tokenizer(), ref.get_tokenizer()
        assert (mine.bos_token_id, mine.eos_token_id, mine.unk_token_id) == (1, 2, 0)
        assert 2 in from_gguf.engine.eos_token_ids
        for text in PLAIN:
            assert mine(text).input_ids == theirs(text).input_ids, text
            assert mine(text).input_ids.count(1) == 1 and mine(text).input_ids[0] == 1
        for text in ANY_TEXT:
            ids = mine(text).input_ids
            assert any(mine.convert_ids_to_tokens(i).startswith("<0x") for i in ids), text  # byte fallback used
            assert mine.decode(ids, skip_special_tokens=True) == text


def test_a_chat_is_served_with_the_sources_greedy_tokens(spm_model: tuple[Path, Path]) -> None:
    src, file = spm_model
    messages = [{"role": "user", "content": "Tell me a story"}, {"role": "assistant", "content": "Once upon a time"},
                {"role": "user", "content": "Go on"}]
    greedy = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    with LLM(str(file), num_blocks=32) as from_gguf, LLM(str(src), num_blocks=32) as ref:
        mine, theirs = from_gguf.get_tokenizer(), ref.get_tokenizer()
        rendered = mine.apply_chat_template(messages, tokenize=False)
        assert rendered == theirs.apply_chat_template(messages, tokenize=False)
        assert rendered.startswith("<s>[INST] Tell me a story [/INST]Once upon a time</s>")
        chat = from_gguf.chat(messages, greedy)[0]
        assert chat.prompt_token_ids[0] == 1 and chat.prompt_token_ids.count(1) == 1
        # The same prompt ids through the directory's weights: the same greedy tokens.
        again = ref.generate([{"prompt_token_ids": chat.prompt_token_ids}], greedy)[0]
        assert chat.outputs[0].token_ids == again.outputs[0].token_ids and len(again.outputs[0].token_ids) == 10
        assert chat.outputs[0].text == mine.decode(chat.outputs[0].token_ids, skip_special_tokens=True)
