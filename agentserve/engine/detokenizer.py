"""Incremental detokenization with stop strings.

Decoding token by token breaks multi-byte characters and word-boundary spaces, so each step decodes
a short window [prefix_offset, end) and emits the part past [prefix_offset, read_offset); text that
ends in an incomplete character (U+FFFD) waits for the next token.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Optional

_REPLACEMENT = "\ufffd"

# Where transformers defines the stock decode path of fast (Rust-backed) tokenizers.
_STOCK_DECODE_MODULES = ("transformers.tokenization_utils_base",)
_STOCK_BACKEND_MODULES = ("transformers.tokenization_utils_tokenizers", "transformers.tokenization_utils_fast")
_DECODERS: "weakref.WeakKeyDictionary[Any, Callable[[list[int], bool], str]]" = weakref.WeakKeyDictionary()


def _defining_module(cls: type, name: str) -> str:
    return next((k.__module__ for k in cls.__mro__ if name in k.__dict__), "")


def decoder_for(tokenizer: Any) -> Callable[[list[int], bool], str]:
    """decode(ids, skip_special_tokens) without cleanup of tokenization spaces. For a stock fast
    tokenizer it calls the Rust tokenizer directly: the same string as tokenizer.decode, without
    its argument conversion layers (several microseconds per call; detokenization runs twice per
    generated token). Tokenizers that override decoding keep their own path."""
    try:
        return _DECODERS[tokenizer]
    except (KeyError, TypeError):
        pass
    backend = getattr(tokenizer, "_tokenizer", None)
    cls = type(tokenizer)
    stock = (backend is not None and type(backend).__module__.startswith("tokenizers")
             and _defining_module(cls, "decode") in _STOCK_DECODE_MODULES
             and _defining_module(cls, "_decode") in _STOCK_BACKEND_MODULES)
    if stock:
        fast: Any = backend  # the tokenizers library's Tokenizer (stock is only true when there is one)

        def fn(ids: list[int], skip: bool) -> str:
            return fast.decode(ids, skip_special_tokens=skip)
    else:
        def fn(ids: list[int], skip: bool) -> str:
            return tokenizer.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
    try:
        _DECODERS[tokenizer] = fn
    except TypeError:
        pass  # not weak-referenceable: no caching
    return fn


def _decoder_without_spaces_between_special_tokens(tokenizer: Any) -> Callable[[list[int], bool], str]:
    """decode(ids, skip_special_tokens) through transformers, which alone takes that option (the Rust
    tokenizer's decode has none)."""
    def fn(ids: list[int], skip: bool) -> str:
        return tokenizer.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False,
                                spaces_between_special_tokens=False)
    return fn


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], skip_special_tokens: bool,
                 stop: list[str], include_stop_str_in_output: bool, min_tokens: int,
                 spaces_between_special_tokens: bool) -> None:
        self.tokenizer = tokenizer
        self._decode_fn = (decoder_for(tokenizer) if skip_special_tokens or spaces_between_special_tokens
                           else _decoder_without_spaces_between_special_tokens(tokenizer))
        self.skip_special_tokens = skip_special_tokens
        self.stop = stop
        self.include_stop = include_stop_str_in_output
        # As vLLM: a stop string counts only in text that output tokens past the first min_tokens add.
        self.min_tokens = min_tokens
        self.num_output_tokens = 0
        self.max_stop_len = max((len(s) for s in stop), default=0)
        # A few prompt tokens of context so that the first output token decodes with its spacing.
        context = prompt_token_ids[-4:]
        self.token_ids: list[int] = list(context)
        self.prefix_offset = 0
        self.read_offset = len(context)
        self.output_text = ""
        # Text held back because it might be the beginning of a stop string.
        self._emitted_len = 0

    def _decode(self, ids: list[int]) -> str:
        return self._decode_fn(ids, self.skip_special_tokens)

    def append(self, token_id: int) -> Optional[str]:
        """Adds one token; returns the matched stop string when one now occurs in the output."""
        self.token_ids.append(token_id)
        self.num_output_tokens += 1
        prefix_text = self._decode(self.token_ids[self.prefix_offset:self.read_offset])
        full_text = self._decode(self.token_ids[self.prefix_offset:])
        if len(full_text) > len(prefix_text) and not full_text.endswith(_REPLACEMENT):
            new_text = full_text[len(prefix_text):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.token_ids)
        else:
            new_text = ""
        if not new_text:
            return None
        old_len = len(self.output_text)
        self.output_text += new_text
        if self.num_output_tokens <= self.min_tokens:
            return None
        for stop in self.stop:
            # A match must end in the new text: one wholly in older text was either checked then or lay
            # in the text of the first min_tokens tokens, where stop strings do not count.
            pos = self.output_text.find(stop, max(0, old_len - len(stop) + 1))
            if pos != -1:
                end = pos + len(stop) if self.include_stop else pos
                self.output_text = self.output_text[:end]
                return stop
        return None

    def take_new_text(self, finished: bool) -> str:
        """Text not yet streamed. While unfinished, the last max_stop_len - 1 characters are held
        back, since they may turn out to start a stop string that must not be emitted."""
        limit = len(self.output_text) if finished or not self.stop else max(
            self._emitted_len, len(self.output_text) - self.max_stop_len + 1)
        delta = self.output_text[self._emitted_len:limit]
        self._emitted_len = limit
        return delta
