"""TokenizerInfo: the per-tokenizer facts every grammar backend needs (token bytes, EOS and special
ids, the bitmask words they occupy), and the byte-level BPE symbol -> byte map.

    info = TokenizerInfo.from_hf(tokenizer, vocab_size=model_vocab, eos_token_ids=eos_ids)  # once
"""

from __future__ import annotations

import hashlib
import json
import threading
from typing import Any, Callable, Optional, Sequence

import numpy as np

from agentserve.grammar.interface import as_int32, bitmask_words
from agentserve.grammar.tool_formats import TOOL_MARKERS


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


UNICODE_TO_BYTE = {c: b for b, c in _bytes_to_unicode().items()}  # byte-level BPE symbol -> byte


def special_tokens(tokenizer: Any) -> dict[int, str]:
    """id -> text of a Hugging Face tokenizer's special tokens: the added tokens marked special, and the named
    ones (bos, eos, ...; all_special_ids lists only those in transformers 5)."""
    found = {int(i): str(t) for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    found.update(zip(tokenizer.all_special_ids, tokenizer.all_special_tokens))
    return found


def _decoder_kind(hf_tokenizer: Any) -> str:
    if not hf_tokenizer.is_fast:  # slow (Python) tokenizers have no tokenizers-library decoder
        return "unknown"
    try:
        decoder = json.loads(hf_tokenizer.backend_tokenizer.to_str()).get("decoder") or {}
    except Exception:
        return "unknown"

    def kinds(d: dict) -> list[str]:
        if d.get("type") == "Sequence":
            return [k for sub in d.get("decoders", []) for k in kinds(sub)]
        return [d.get("type", "")]

    found = kinds(decoder)
    if "ByteLevel" in found:
        return "byte_level"
    if "ByteFallback" in found or "Metaspace" in found:
        return "sentencepiece"
    return "unknown"


class TokenizerInfo:
    """Per-tokenizer facts every backend needs, built once per (tokenizer, model vocab size).

    token_bytes[i]: the bytes token i stands for (special tokens: their text). vocab_size: the
    model's logits width (>= len(tokenizer); ids past the tokenizer are padding, never allowed).
    """

    def __init__(self, token_bytes: list[bytes], *, vocab_size: int, eos_token_ids: Sequence[int],
                 special_ids: Sequence[int], hf_tokenizer: Any = None, name: str = "") -> None:
        if vocab_size < len(token_bytes):
            raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer ({len(token_bytes)} tokens)")
        eos = tuple(dict.fromkeys(int(e) for e in eos_token_ids))
        if not eos:
            raise ValueError("the tokenizer has no EOS token; pass eos_token_ids")
        if any(not 0 <= e < vocab_size for e in eos):
            raise ValueError(f"EOS ids {eos} out of range for vocab_size {vocab_size}")
        self.token_bytes = token_bytes
        self.tokenizer_vocab_size = len(token_bytes)
        self.vocab_size = int(vocab_size)
        self.eos_token_ids = eos
        self.special_ids = frozenset(int(i) for i in special_ids)
        self.hf_tokenizer = hf_tokenizer
        self.name = name
        self._lock = threading.Lock()
        self._cache: dict[Any, Any] = {}
        self._text_to_id: Optional[dict[bytes, int]] = None
        h = hashlib.sha256()
        h.update(f"{self.vocab_size}|{eos}|{sorted(self.special_ids)}|".encode())
        for b in token_bytes:
            h.update(len(b).to_bytes(4, "little"))
            h.update(b)
        self.identity = h.hexdigest()[:32]

    @classmethod
    def from_hf(cls, tokenizer: Any, vocab_size: Optional[int] = None,
                eos_token_ids: Optional[Sequence[int]] = None) -> "TokenizerInfo":
        """From a Hugging Face tokenizer (fast tokenizers: byte-level BPE or sentencepiece-style)."""
        n = len(tokenizer)
        kind = _decoder_kind(tokenizer)
        added = {int(i): t for i, t in tokenizer.added_tokens_decoder.items()}
        special = special_tokens(tokenizer)
        id_to_tok = tokenizer.convert_ids_to_tokens(list(range(n)))
        token_bytes: list[bytes] = []
        for i, tok in enumerate(id_to_tok):
            if tok is None:
                token_bytes.append(b"")
            elif i in added:
                token_bytes.append(str(added[i]).encode("utf-8"))
            elif kind == "byte_level":
                try:
                    token_bytes.append(bytes(UNICODE_TO_BYTE[c] for c in tok))
                except KeyError:
                    token_bytes.append(tok.encode("utf-8"))
            elif kind == "sentencepiece":
                if len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
                    token_bytes.append(bytes([int(tok[3:5], 16)]))
                else:
                    token_bytes.append(tok.replace("\u2581", " ").encode("utf-8"))
            else:
                token_bytes.append(tokenizer.convert_tokens_to_string([tok]).encode("utf-8"))
        if eos_token_ids is None:
            eos = tokenizer.eos_token_id
            eos_token_ids = list(eos) if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else [])
        name = tokenizer.name_or_path or ""
        return cls(token_bytes, vocab_size=vocab_size or n, eos_token_ids=eos_token_ids,
                   special_ids=sorted(special), hf_tokenizer=tokenizer, name=str(name))

    # -- helpers --------------------------------------------------------------------------------
    def single_token_id(self, text: str) -> Optional[int]:
        """The id of the one token whose text is exactly `text` (added/special tokens first)."""
        if self._text_to_id is None:
            m: dict[bytes, int] = {}
            for i, b in enumerate(self.token_bytes):
                if b and (b not in m or i in self.special_ids):
                    m[b] = i
            self._text_to_id = m
        return self._text_to_id.get(text.encode("utf-8"))

    def marker_ids(self) -> frozenset[int]:
        """Ids of single tokens that spell a tool-call marker (`<tool_call>`, `[TOOL_CALLS]`, ...)."""
        return frozenset(i for m in TOOL_MARKERS if (i := self.single_token_id(m)) is not None)

    def cached(self, key: Any, build: Callable[[], Any]) -> Any:
        """Per-tokenizer cache for backend objects (library tokenizers, vocabularies)."""
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        value = build()
        with self._lock:
            return self._cache.setdefault(key, value)

    def eos_words(self) -> tuple["np.ndarray", "np.ndarray"]:
        """(word indices, int32 bit masks) of the EOS ids, one entry per distinct word."""

        def build() -> tuple[np.ndarray, np.ndarray]:
            acc: dict[int, int] = {}
            for e in self.eos_token_ids:
                acc[e >> 5] = acc.get(e >> 5, 0) | (1 << (e & 31))
            words = np.array(sorted(acc), dtype=np.int64)
            bits = np.array([as_int32(acc[w]) for w in sorted(acc)], dtype=np.int32)
            return words, bits

        return self.cached("eos_words", build)

    def forbidden_words(self, allow_markers: bool) -> "np.ndarray":
        """int32 [words]: bits of ids never allowed by a grammar (padding, special tokens other
        than EOS; with allow_markers, tool-marker tokens stay allowed). EOS bits are clear."""

        def build() -> np.ndarray:
            bad = set(range(self.tokenizer_vocab_size, self.vocab_size))
            bad |= set(self.special_ids) - set(self.eos_token_ids)
            if allow_markers:
                bad -= self.marker_ids()
            words = [0] * bitmask_words(self.vocab_size)
            for i in bad:
                words[i >> 5] |= 1 << (i & 31)
            return np.array([as_int32(w) for w in words], dtype=np.int32)

        return self.cached(("forbidden", allow_markers), build)
