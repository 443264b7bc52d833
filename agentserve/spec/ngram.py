"""N-gram prompt lookup: propose the tokens that followed an earlier occurrence of the context's tail.

Agents copy tool results, file contents and names into their outputs, so the last few generated
tokens often occur earlier in the context, and what followed them there is a good guess for what comes
next. No model runs; every proposal is verified by the target (sampling/rejection.py).

Matching (for one context a of length L): the longest n in [prompt_lookup_min, prompt_lookup_max] for
which the last n tokens a[L-n:] occur earlier (ending at some e <= L - 2); among the occurrences of that
length, the most recent one. vLLM's NgramProposer also takes the longest n but the earliest occurrence;
the most recent is the better guess when the same text was copied more than once with edits (the latest
copy is the one being continued), and it is what a repetition loop continues.

The proposal is a[e+1], a[e+2], ... copied with overlap (as LZ77 does): when the occurrence is closer to
the end than k tokens, the copy runs on into the tokens it is proposing, i.e. a periodic tail keeps
its period (a context ending in "x y x y" proposes "x y x y ..." up to k, not just the 2 tokens that
exist after the match).

Cost: one vectorised comparison over the context (candidate ends e with a[e] == a[L-1]), then at most
prompt_lookup_max - 1 comparisons over the surviving candidates, which shrink fast on real text.
Everything is numpy; no Python loop runs over the context.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np

TokenIds = Union[np.ndarray, Sequence[int]]


class NgramProposer:
    def __init__(self, prompt_lookup_min: int, prompt_lookup_max: int, num_speculative_tokens: int,
                 max_model_len: Optional[int] = None) -> None:
        if prompt_lookup_min < 1:
            raise ValueError(f"prompt_lookup_min must be >= 1, got {prompt_lookup_min}")
        if prompt_lookup_max < prompt_lookup_min:
            raise ValueError(f"prompt_lookup_max ({prompt_lookup_max}) must be >= prompt_lookup_min "
                             f"({prompt_lookup_min})")
        if num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {num_speculative_tokens}")
        self.prompt_lookup_min = prompt_lookup_min
        self.prompt_lookup_max = prompt_lookup_max
        self.num_speculative_tokens = num_speculative_tokens
        self.max_model_len = max_model_len

    def propose(self, contexts: Sequence[TokenIds], num_speculative_tokens: Optional[Sequence[int]] = None
                ) -> list[list[int]]:
        """Drafts for each context (prompt + output ids; an int numpy array avoids a per-step copy).
        `num_speculative_tokens[i]` caps row i below the configured k (dynamic speculation, max_tokens)."""
        if num_speculative_tokens is None:
            num_speculative_tokens = [self.num_speculative_tokens] * len(contexts)
        return [self.propose_one(np.asarray(c), min(k, self.num_speculative_tokens)).tolist()
                for c, k in zip(contexts, num_speculative_tokens, strict=True)]

    def propose_one(self, tokens: np.ndarray, k: Optional[int] = None) -> np.ndarray:
        """Up to k draft tokens for one context (empty when its tail occurs nowhere earlier)."""
        k = self.num_speculative_tokens if k is None else k
        length = int(tokens.shape[0])
        if self.max_model_len is not None:
            k = min(k, self.max_model_len - length)
        if k <= 0 or length < self.prompt_lookup_min + 1:
            return tokens[:0]
        match = self.find_match(tokens)
        if match is None:
            return tokens[:0]
        end, _ = match
        distance = length - 1 - end  # >= 1: how far the occurrence ends before the context does
        return tokens[end + 1 + np.arange(k) % distance]

    def find_match(self, tokens: np.ndarray) -> Optional[tuple[int, int]]:
        """(end index e, n) of the most recent occurrence of the longest matching tail, n >= min."""
        length = int(tokens.shape[0])
        # Candidate ends: every e <= L - 2 whose token equals the last one (an n-gram of length 1).
        ends = np.flatnonzero(tokens[:length - 1] == tokens[length - 1])
        best_ends, best_n = ends, 1
        for back in range(1, min(self.prompt_lookup_max, length - 1)):
            if ends.size == 0:
                break
            ends = ends[ends >= back]  # the occurrence must start at index >= 0
            ends = ends[tokens[ends - back] == tokens[length - 1 - back]]
            if ends.size:
                best_ends, best_n = ends, back + 1
        if best_n < self.prompt_lookup_min or best_ends.size == 0:
            return None
        return int(best_ends[-1]), best_n  # flatnonzero is ascending: the last is the most recent
