"""Tokens that would make the output invalid UTF-8 after the bytes generated so far.

xgrammar (0.2) matches a negated class (`"pattern": "^[^,]{3}$"`) byte by byte without UTF-8's limits on
a sequence's second byte: with byte-level tokens it wrote overlong forms (F0 8E B4 92, E0 8C AB) and
surrogates (ED A3 A7). The text decodes with U+FFFD in their place, so a string broke its pattern or
its maxLength (Github_easy/o40224 of the schema sample). A matcher that knows the incomplete character
at the end of its output (`utf8_tail`) clears the tokens that cannot continue it (`invalid_after`).
"""

from __future__ import annotations

import codecs
import re

import numpy as np

from agentserve.grammar.interface import as_int32, bitmask_words
from agentserve.grammar.tokenizer_info import TokenizerInfo

# Lead bytes whose next byte has a narrower range than 80-BF (overlong forms, surrogates, > U+10FFFF).
_NARROW_LEADS = frozenset({0xE0, 0xED, 0xF0, 0xF4})
# The start of an encoded surrogate, which Python's incremental decoder refuses only at its third byte.
_SURROGATE_START = re.compile(b"\xed[\xa0-\xbf]")


# One tail of each class (tail_class): no tail, one or more plain continuation bytes to come, and the
# lead bytes whose next byte is narrower.
TAIL_CLASSES = (b"", b"\xc2", b"\xe1", b"\xf1", b"\xe0", b"\xed", b"\xf0", b"\xf4")


def utf8_tail(tail: bytes, token: bytes) -> bytes:
    """The incomplete character at the end of `tail + token` (b"" when it ends on a whole character)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore")
    decoder.decode(tail + token, final=False)
    return decoder.getstate()[0]


def tail_class(tail: bytes) -> bytes:
    """A representative of the tails whose valid continuations are the same: the lead byte alone when
    it narrows the next byte, else one lead byte that needs as many continuation bytes as `tail` does."""
    if not tail:
        return b""
    if len(tail) == 1 and tail[0] in _NARROW_LEADS:
        return tail
    lead = tail[0]
    needed = (1 if lead < 0xE0 else 2 if lead < 0xF0 else 3) - (len(tail) - 1)
    return {1: b"\xc2", 2: b"\xe1", 3: b"\xf1"}[needed]


def invalid_after(info: TokenizerInfo, tail: bytes) -> tuple[np.ndarray, frozenset[int]]:
    """(int32 bitmask words that clear them, ids) of the tokens whose bytes cannot follow `tail` in
    valid UTF-8 (a continuation byte with nothing to continue, too few continuation bytes, an overlong
    form, ...). Built once per tokenizer and tail class."""
    key = tail_class(tail)

    def build() -> tuple[np.ndarray, frozenset[int]]:
        # An ASCII token is whole after no tail and cannot follow any tail: only the others are decoded.
        bad = [] if not key else [i for i, t in enumerate(info.token_bytes) if t and t.isascii()]
        for i in _non_ascii_ids(info):
            data = key + info.token_bytes[i]
            try:
                codecs.getincrementaldecoder("utf-8")().decode(data, final=False)
            except UnicodeDecodeError:
                bad.append(i)
                continue
            if _SURROGATE_START.search(data):
                bad.append(i)
        bad = [i for i in bad if i not in info.eos_token_ids]
        words = [0] * bitmask_words(info.vocab_size)
        for i in bad:
            words[i >> 5] |= 1 << (i & 31)
        return ~np.array([as_int32(w) for w in words], dtype=np.int32), frozenset(bad)

    return info.cached(("utf8.invalid_after", key), build)


def _non_ascii_ids(info: TokenizerInfo) -> list[int]:
    return info.cached("utf8.non_ascii_ids", lambda: [i for i, t in enumerate(info.token_bytes) if not t.isascii()])


def build_all(info: TokenizerInfo) -> None:
    """Builds every tail class's tokens now (a few hundred ms for a 150k vocabulary, once per tokenizer),
    so that the step that first needs one does not."""
    for tail in TAIL_CLASSES:
        invalid_after(info, tail)
