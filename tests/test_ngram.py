"""N-gram prompt lookup: crafted contexts, agreement with a brute-force reference, and a 16k context."""

from __future__ import annotations

import time
from typing import Optional

import numpy as np
import pytest

from agentserve.spec.ngram import NgramProposer


def propose(context: list[int], k: int = 3, lo: int = 1, hi: int = 3, max_model_len: Optional[int] = None) -> list[int]:
    return NgramProposer(lo, hi, k, max_model_len).propose([np.array(context, dtype=np.int64)])[0]


def test_repetition_proposes_what_followed() -> None:
    assert propose([1, 2, 3, 4, 1, 2, 3], k=1) == [4]
    # k > tokens after the match: the copy runs on into its own proposal (overlapping copy).
    assert propose([1, 2, 3, 4, 1, 2, 3], k=6) == [4, 1, 2, 3, 4, 1]


def test_periodic_tail_keeps_its_period() -> None:
    assert propose([1, 2, 1, 2, 1, 2], k=5) == [1, 2, 1, 2, 1]
    assert propose([7, 7, 7], k=4) == [7, 7, 7, 7]


def test_no_match_proposes_nothing() -> None:
    assert propose([1, 2, 3, 4, 5]) == []
    assert propose([]) == []
    assert propose([9]) == []


def test_min_n_filters_short_matches() -> None:
    context = [1, 5, 2, 3, 5]  # the tail "5" occurs earlier; "3 5" does not
    assert propose(context, lo=1, hi=3) == [2, 3, 5]
    assert propose(context, lo=2, hi=3) == []


def test_longest_match_wins_over_recent_shorter_one() -> None:
    # "2 3" occurs at ends 2 and 6; only the older one extends to the tail's "1 2 3".
    context = [1, 2, 3, 7, 9, 2, 3, 8, 1, 2, 3]
    assert propose(context, k=2, hi=3) == [7, 9]
    # With max n = 2 both are length-2 matches: the most recent one wins.
    assert propose(context, k=2, hi=2) == [8, 1]


def test_most_recent_of_equal_matches() -> None:
    context = [5, 6, 7, 9, 5, 6, 8, 0, 5, 6]
    assert propose(context, k=2) == [8, 0]


def test_k_limits() -> None:
    context = list(range(20)) + list(range(5))
    assert propose(context, k=4) == [5, 6, 7, 8]
    assert propose(context, k=4, max_model_len=len(context) + 2) == [5, 6]
    assert propose(context, k=4, max_model_len=len(context)) == []
    proposer = NgramProposer(1, 3, 4)
    capped = proposer.propose([np.array(context), np.array(context)], num_speculative_tokens=[2, 9])
    assert capped == [[5, 6], [5, 6, 7, 8]]  # a row's cap never exceeds the configured k


def test_lists_and_arrays_agree() -> None:
    context = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 1, 4, 1]
    proposer = NgramProposer(1, 4, 3)
    assert proposer.propose([context]) == proposer.propose([np.array(context, dtype=np.int32)]) == [[5, 9, 2]]


@pytest.mark.parametrize(("field", "args"), [("prompt_lookup_min", (0, 3, 2)), ("prompt_lookup_max", (3, 2, 2)),
                                             ("num_speculative_tokens", (1, 2, 0))])
def test_bad_config_names_the_field(field: str, args: tuple[int, int, int]) -> None:
    with pytest.raises(ValueError, match=field):
        NgramProposer(*args)


def reference_match(tokens: list[int], lo: int, hi: int) -> Optional[tuple[int, int]]:
    """Brute force: for n from hi down to lo, the latest end e <= L-2 with tokens[e-n+1:e+1] == tail."""
    length = len(tokens)
    for n in range(hi, lo - 1, -1):
        if n > length - 1:
            continue
        tail = tokens[length - n:]
        for end in range(length - 2, n - 2, -1):
            if tokens[end - n + 1:end + 1] == tail:
                return end, n
    return None


def test_agrees_with_brute_force_on_random_contexts() -> None:
    rng = np.random.default_rng(0)
    checked_matches = 0
    for trial in range(300):
        length = int(rng.integers(1, 60))
        vocab = int(rng.integers(2, 6))  # small alphabets: many overlapping matches
        tokens = rng.integers(0, vocab, size=length)
        lo = int(rng.integers(1, 3))
        hi = lo + int(rng.integers(0, 4))
        proposer = NgramProposer(lo, hi, 5)
        expected = reference_match(tokens.tolist(), lo, hi)
        assert proposer.find_match(tokens) == expected, (trial, tokens.tolist(), lo, hi)
        if expected is not None:
            checked_matches += 1
            end, _ = expected
            continuation = tokens.tolist()
            for _ in range(5):  # the overlapping copy, one token at a time
                continuation.append(continuation[len(continuation) - (length - 1 - end)])
            assert proposer.propose_one(tokens).tolist() == continuation[length:]
    assert checked_matches > 100


def test_16k_context_copying_a_tool_result() -> None:
    rng = np.random.default_rng(1)
    tool_result = rng.integers(100, 32000, size=4000)
    prefix = rng.integers(100, 32000, size=12000)
    copied = 37
    context = np.concatenate([prefix, tool_result, tool_result[:copied]])  # the output copies the result
    proposer = NgramProposer(2, 5, 8)
    assert proposer.propose([context])[0] == tool_result[copied:copied + 8].tolist()

    repeated = np.full(16384, 7, dtype=np.int64)  # worst case: every position is a candidate
    assert proposer.propose([repeated])[0] == [7] * 8
    for name, ctx in (("copy", context), ("all-same", repeated)):
        start = time.perf_counter()
        for _ in range(20):
            proposer.propose_one(ctx)
        print(f"ngram propose on {ctx.shape[0]} tokens ({name}): {(time.perf_counter() - start) / 20 * 1e6:.0f} us")
