"""A sentencepiece-style tokenizer (Llama 2 / Mistral v0.1-v0.3: `▁` word marks, BPE with byte
fallback to `<0xNN>` pieces, `<unk>` `<s>` `</s>` at ids 0-2, a BOS added) trained on the tiny corpus
without the sentencepiece package, put in a copy of a tiny model directory; and the GGUF vocabulary
llama.cpp's `_set_vocab_sentencepiece` writes for such a tokenizer (`tokenizer.ggml.model` "llama":
pieces, scores, token types, no merges)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from agentserve.model.arch_config import ArchConfig
from agentserve.testing.tiny import CORPUS_PATH

MISTRAL_LIKE_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} "
                         "[/INST]{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")


def with_sentencepiece_tokenizer(src: Path, dst: Path) -> Path:
    """A copy of the tiny model directory `src` whose tokenizer is sentencepiece-style, trained to fill
    most of the model's vocabulary (a few ids past it stay unused, as [PAD<i>] in the GGUF)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import LlamaTokenizerFast

    arch = ArchConfig.from_dir(src)
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    # Llama 2's tokenizer.json pipeline: a `▁` before the text, spaces as `▁`, no pre-tokenizer.
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=arch.vocab_size - 8, min_frequency=2, show_progress=False,
                                  special_tokens=["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)])
    tok.train_from_iterator(CORPUS_PATH.read_text(encoding="utf-8").split("\n\n"), trainer=trainer)
    hf = LlamaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            add_bos_token=True, add_eos_token=False, chat_template=MISTRAL_LIKE_TEMPLATE)
    shutil.copytree(src, dst)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (dst / name).unlink(missing_ok=True)
    hf.save_pretrained(str(dst))
    return dst


def add_sentencepiece_vocab(writer: Any, src: Path, vocab_size: int) -> None:
    """`_set_vocab_sentencepiece`: every id up to the model's vocab size; sentencepiece's scores (0 for
    control, unknown and byte pieces, falling with the merge rank for the others) and token types;
    special ids, add_bos and the chat template from the directory."""
    import gguf
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(src))
    by_id = {i: t for t, i in tok.get_vocab().items()}
    tokens, scores, types = [], [], []
    for i in range(vocab_size):
        piece = by_id.get(i)
        if piece is None:
            tokens.append(f"[PAD{i}]"), scores.append(-1000.0), types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(piece)
        if piece == tok.unk_token:
            scores.append(0.0), types.append(gguf.TokenType.UNKNOWN)
        elif piece in tok.all_special_tokens:
            scores.append(0.0), types.append(gguf.TokenType.CONTROL)
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            scores.append(0.0), types.append(gguf.TokenType.BYTE)
        else:
            scores.append(-float(i)), types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    gguf.SpecialVocab(str(src), load_merges=False, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)
