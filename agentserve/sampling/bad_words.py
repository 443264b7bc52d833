"""vLLM's `bad_words`: words the output must not contain. Each word is tokenized as it would start the
text and, where that gives a different first token of the same length, as it would follow a space; the
last token of a word's ids is banned at a position whose preceding output tokens end with the rest of
its ids (a one-token word is banned everywhere). The bans depend on the tokens just before each position,
so a request with bad words decodes without speculation (engine/speculation.py) and async scheduling waits
for its previous token (Engine.needs_host_tokens)."""

from __future__ import annotations

from typing import Any, Sequence

from agentserve.errors import InvalidRequestError


def bad_words_token_ids(tokenizer: Any, words: Sequence[str], vocab_size: int) -> list[list[int]]:
    """The token id sequences to keep out of the output, as vLLM tokenizes them."""
    if tokenizer is None:
        raise InvalidRequestError("bad_words needs the model's tokenizer; this model has none")
    sequences: list[list[int]] = []
    for word in words:
        plain = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        if not plain:
            raise InvalidRequestError(f"bad_words entry {word!r} tokenizes to nothing")
        sequences.append(plain)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        # A leading space that makes a new word token (not a separate space token) is a second spelling.
        if spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
            sequences.append(spaced)
    bad = [t for seq in sequences for t in seq if t >= vocab_size]
    if bad:
        raise InvalidRequestError(f"bad_words tokenize to ids outside the model's vocabulary ({vocab_size}): {bad[:5]}")
    return sequences


def banned_next_tokens(sequences: Sequence[Sequence[int]], output_token_ids: Sequence[int]) -> list[int]:
    """The tokens the next position may not take, given the output so far."""
    banned = []
    for seq in sequences:
        prefix = len(seq) - 1
        if prefix == 0 or (len(output_token_ids) >= prefix and list(output_token_ids[-prefix:]) == list(seq[:-1])):
            banned.append(seq[-1])
    return banned
