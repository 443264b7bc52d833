"""GGUF files laid out the way llama.cpp's convert_hf_to_gguf.py and gguf-split write them, built here
from tiny models (tests/helpers/gguf_checkpoints.py): each serves exactly the greedy tokens of the
engine on the Hugging Face directory holding the weights the file dequantizes to, or fails at
start-up naming what is wrong.

- the tokenizer and chat template from the file's `tokenizer.ggml.*` metadata (GPT-2 style BPE, as
  written for Qwen2 / Qwen3 / Llama 3), no tokenizer= needed;
- Q8_0 / Q4_0 / F16 / BF16 tensors (gguf.quants quantizes them), tied and separate output.weight,
  a Mistral model written as llama, no `<arch>.vocab_size` key;
- a model split in shards: served from its first shard or from a directory holding them; a missing
  shard, a later shard passed as the model, or a directory of unrelated files are errors."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from agentserve import SamplingParams
from agentserve.llm import LLM
from agentserve.model import gguf as agentserve_gguf
from agentserve.model.arch_config import ArchConfig, ModelLoadError
from agentserve.testing import tiny_model_cached
from helpers.gguf_checkpoints import dequantized_copy, write_gguf

gguf = pytest.importorskip("gguf")

PROMPTS = ["The quick brown fox", "In a distant galaxy, a small robot named"]
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colors, héllo 123!"}]


def _tokens(path: Path, **kwargs: Any) -> list[list[int]]:
    with LLM(str(path), num_blocks=64, **kwargs) as llm:
        return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]


@pytest.mark.parametrize("tiny_arch,gguf_arch,pre", [("qwen2", "qwen2", "qwen2"), ("qwen3", "qwen3", "qwen2"),
                                                     ("llama3", "llama", "llama-bpe")])
def test_tokenizer_and_chat_template_from_gguf_metadata(tiny_arch: str, gguf_arch: str, pre: str,
                                                        tmp_path: Path) -> None:
    src = tiny_model_cached(tiny_arch)
    file = write_gguf(src, tmp_path / "m.gguf", gguf_arch, tokenizer_pre=pre)
    with LLM(str(file), num_blocks=64) as from_gguf, LLM(str(src), num_blocks=64) as ref:
        ours, theirs = from_gguf.tokenizer, ref.tokenizer
        assert ours.chat_template == theirs.chat_template
        text = theirs.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
        assert ours.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False) == text
        assert ours(text, add_special_tokens=False)["input_ids"] == theirs(text, add_special_tokens=False)["input_ids"]
        got = [o.outputs[0].token_ids for o in from_gguf.chat([CHAT], GREEDY)]
        want = [o.outputs[0].token_ids for o in ref.chat([CHAT], GREEDY)]
        assert got == want
        # The file has one eos id and no generation_config.json; its end-of-generation control tokens
        # (llama.cpp's set) give the directory's generation_config eos list.
        assert from_gguf.engine.eos_token_ids == ref.engine.eos_token_ids and len(ref.engine.eos_token_ids) >= 2


def test_a_gguf_tokenizer_is_built_once_per_file_and_each_engine_gets_its_own(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers re-parses the whole file to build a GGUF's tokenizer (seconds for a real vocabulary):
    a second engine on the same file reuses it, as a copy of its own (one engine's chat_template override
    does not reach the other), and a rewritten file is read afresh."""
    import transformers

    src = tiny_model_cached("qwen2")
    file = write_gguf(src, tmp_path / "m.gguf", "qwen2", tokenizer_pre="qwen2")
    built: list[str] = []
    real = transformers.AutoTokenizer.from_pretrained

    def counting(*args: Any, **kwargs: Any) -> Any:
        if "gguf_file" in kwargs:  # (write_gguf reads the source directory's tokenizer too)
            built.append(kwargs["gguf_file"])
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", counting)
    with LLM(str(file), num_blocks=16, chat_template="{{ 'override' }}") as first, LLM(str(file), num_blocks=16) as second:
        assert built == ["m.gguf"]
        assert first.tokenizer is not second.tokenizer
        assert first.tokenizer.chat_template == "{{ 'override' }}"
        assert second.tokenizer.chat_template == (src / "chat_template.jinja").read_text(encoding="utf-8")
        assert first.tokenizer("héllo 123")["input_ids"] == second.tokenizer("héllo 123")["input_ids"]
    write_gguf(src, file, "qwen2", tokenizer_pre="qwen2")
    with LLM(str(file), num_blocks=16):
        assert built == ["m.gguf", "m.gguf"]


@pytest.mark.parametrize("tiny_arch,gguf_arch,qtype,tie", [
    ("llama", "llama", "Q8_0", None), ("qwen2", "qwen2", "F16", None), ("qwen3", "qwen3", "BF16", None),
    ("llama", "llama", "Q4_0", True),  # no output.weight: the lm_head is the embedding
    ("mistral", "llama", "Q8_0", None),  # convert_hf_to_gguf writes Mistral as llama (permuted q / k)
])
def test_quantized_tensor_types_match_the_dequantized_weights(tiny_arch: str, gguf_arch: str, qtype: str,
                                                             tie: Any, tmp_path: Path) -> None:
    src = tiny_model_cached(tiny_arch)
    file = write_gguf(src, tmp_path / "m.gguf", gguf_arch, qtype=qtype, tie=tie)
    reference = dequantized_copy(src, tmp_path / "deq", qtype, tie=tie)
    with LLM(str(file), tokenizer=str(src), num_blocks=64) as llm:
        assert llm.engine.arch.tie_word_embeddings == ArchConfig.from_dir(reference).tie_word_embeddings
        got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]
    assert got == _tokens(reference)


def test_vocab_size_comes_from_the_embedding(tmp_path: Path) -> None:
    """convert_hf_to_gguf writes `<arch>.vocab_size` for some architectures only: without it (and
    without a token list) the embedding's rows give the vocabulary (it was 0)."""
    src = tiny_model_cached("qwen2")
    file = write_gguf(src, tmp_path / "m.gguf", "qwen2", drop_keys=("vocab_size",))
    assert _tokens(file, tokenizer=str(src)) == _tokens(src)


def test_split_model_from_its_first_shard_or_its_directory(tmp_path: Path) -> None:
    src = tiny_model_cached("llama3")
    (tmp_path / "split").mkdir()
    first = write_gguf(src, tmp_path / "split" / "m.gguf", "llama", tokenizer_pre="llama-bpe", split_max_tensors=7)
    names = sorted(f.name for f in first.parent.iterdir())
    count = len(names)
    assert count >= 3 and names == [f"m-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]
    want = _tokens(src)
    assert _tokens(first) == want  # the tokenizer from the first shard's metadata
    assert _tokens(first.parent) == want
    with pytest.raises(ModelLoadError, match=rf"m-00002-of-{count:05d}.gguf is shard 2 of a GGUF model split in "
                                             rf"{count}; pass the first shard"):
        LLM(str(first.parent / names[1]), tokenizer=str(src), num_blocks=16)
    (first.parent / names[2]).unlink()
    with pytest.raises(ModelLoadError, match=f"is the first of {count} GGUF shards, but {names[2]} is missing"):
        LLM(str(first), tokenizer=str(src), num_blocks=16)
    # Shards of two different splits (or files of several quantizations) in one directory: which to serve?
    other = tmp_path / "two"
    other.mkdir()
    for name in names[:2]:
        shutil.copy(first.parent / name, other / name)
    shutil.copy(first, other / "n-00001-of-00002.gguf")
    with pytest.raises(ModelLoadError, match="holds several GGUF files"):
        LLM(str(other), tokenizer=str(src), num_blocks=16)


def test_one_engine_load_parses_each_gguf_file_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shape, the tokenizer check and the weights share one parse of the file; a load after it parses
    afresh (nothing parsed is kept past the load), and a split model's shards are parsed once each."""
    src = tiny_model_cached("qwen2")
    file = write_gguf(src, tmp_path / "m.gguf", "qwen2", tokenizer_pre="qwen2")
    (tmp_path / "split").mkdir()
    first = write_gguf(src, tmp_path / "split" / "m.gguf", "qwen2", tokenizer_pre="qwen2", split_max_tensors=9)
    opened: list[str] = []
    real_reader = agentserve_gguf.GGUFFile

    def counting_reader(path: Path) -> Any:
        opened.append(Path(path).name)  # (transformers' GGUF tokenizer loader parses the file its own way)
        return real_reader(path)

    monkeypatch.setattr(agentserve_gguf, "GGUFFile", counting_reader)
    want = _tokens(src)
    assert _tokens(file) == want
    assert opened == ["m.gguf"]
    assert _tokens(file) == want
    assert opened == ["m.gguf"] * 2
    opened.clear()
    assert _tokens(first) == want
    shards = sorted(f.name for f in first.parent.iterdir())
    assert len(shards) >= 2 and sorted(opened) == shards


def test_a_llama3_gguf_stops_at_eom_and_eot_though_its_eos_is_end_of_text(tmp_path: Path) -> None:
    """The file's eos id is one token; <|eom_id|> and <|eot_id|>, control tokens of its vocabulary, end a
    reply too (as the Hugging Face directory's generation_config says, and as llama.cpp does)."""
    src = tiny_model_cached("llama3")
    file = write_gguf(src, tmp_path / "m.gguf", "llama", tokenizer_pre="llama-bpe")
    with LLM(str(file), num_blocks=64) as llm:
        tok = llm.tokenizer
        for text in ("<|eom_id|>", "<|eot_id|>", "<|end_of_text|>"):
            only = SamplingParams(max_tokens=5, temperature=0.0, allowed_token_ids=[tok.convert_tokens_to_ids(text)])
            out = llm.generate(["Hello"], only)[0].outputs[0]
            assert (len(out.token_ids), out.finish_reason) == (1, "stop"), text
