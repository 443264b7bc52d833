"""Incremental detokenization with stop strings.

Decoding token by token breaks multi-byte characters and word-boundary spaces, so each step decodes
a short window [prefix_offset, end) and emits the part past [prefix_offset, read_offset); text that
ends in an incomplete character (U+FFFD) waits for the next token.
"""

from __future__ import annotations

from typing import Any, Optional

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], skip_special_tokens: bool,
                 stop: list[str], include_stop_str_in_output: bool) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = stop
        self.include_stop = include_stop_str_in_output
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
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def append(self, token_id: int) -> Optional[str]:
        """Adds one token; returns the matched stop string when one now occurs in the output."""
        self.token_ids.append(token_id)
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
        start = max(0, len(self.output_text) - self.max_stop_len + 1)
        self.output_text += new_text
        for stop in self.stop:
            pos = self.output_text.find(stop, start)
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
