"""vLLM's bad_words: no output contains a banned word's token ids (both spellings vLLM tokenizes: as the
text's start and after a space), with async scheduling and beside speculating rows (a request with bad
words decodes without speculation: each position's bans depend on the tokens before it); validated; over
HTTP (vLLM's extra field) and gRPC (SamplingParams.bad_words, field 16)."""

from __future__ import annotations

from collections import Counter

import pytest

from agentserve import SamplingParams
from agentserve.llm import LLM
from agentserve.sampling.bad_words import bad_words_token_ids, banned_next_tokens
from agentserve.sampling_params import SamplingParamsError
from agentserve.testing import tiny_model_cached

PROMPTS = ["The weather today is", "Write a list of fruits:"]
ENGINE = dict(device="cpu", dtype="float32", block_size=4, num_blocks=128)


def _contains(ids: list[int], seq: list[int]) -> bool:
    return any(ids[i:i + len(seq)] == seq for i in range(len(ids) - len(seq) + 1))


def test_banned_next_tokens_matches_the_word_prefix() -> None:
    seqs = [[7], [3, 4, 5]]
    assert banned_next_tokens(seqs, []) == [7]
    assert banned_next_tokens(seqs, [1, 3]) == [7]
    assert banned_next_tokens(seqs, [1, 3, 4]) == [7, 5]
    assert banned_next_tokens(seqs, [3, 4, 9]) == [7]


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_outputs_avoid_the_words_and_match_without_speculation(async_scheduling: bool) -> None:
    path = str(tiny_model_cached("llama3"))
    llm = LLM(path, async_scheduling=async_scheduling, **ENGINE)
    tok = llm.tokenizer
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    plain = [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, params)]
    # The words: the two most frequent tokens' text in the first output (the words it leans on).
    common = [t for t, _ in Counter(plain[0]).most_common() if tok.decode([t]).strip()][:2]
    words = [tok.decode([t]).strip() for t in common]
    seqs = bad_words_token_ids(tok, words, llm.engine.arch.vocab_size)
    assert any(_contains(plain[0], seq) for seq in seqs)  # the ban has something to remove
    banned = params.clone(bad_words=words)
    outs = [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, [banned, params])]
    assert not any(_contains(outs[0], seq) for seq in seqs) and outs[0] != plain[0]
    assert outs[1] == plain[1]  # the unrestricted row beside it is untouched
    llm.close()
    spec = LLM(path, async_scheduling=async_scheduling, speculative_method="ngram", prompt_lookup_min=1,
               num_speculative_tokens=3, spec_dynamic=False, **ENGINE)
    again = [list(o.outputs[0].token_ids) for o in spec.generate(PROMPTS, [banned, params])]
    assert again == outs
    assert spec.engine.metrics.spec_num_draft_tokens > 0  # the unrestricted row speculated
    spec.close()


def test_bad_words_are_validated() -> None:
    for bad in (["ok", ""], "word", [3], ["  "]):
        with pytest.raises(SamplingParamsError, match="bad_words must be a list of non-empty strings"):
            SamplingParams(bad_words=bad)


def test_bad_words_over_http_and_grpc_fields() -> None:
    from agentserve.adapters.client.client import to_sampling
    from agentserve.service.convert import sampling_from_proto

    sp = to_sampling(bad_words=["foo", "bar baz"], allowed_token_ids=[1, 2])
    params = sampling_from_proto(sp)
    assert params.bad_words == ["foo", "bar baz"] and params.allowed_token_ids == [1, 2]
    from agentserve.adapters.openai.protocol import CompletionRequest

    assert CompletionRequest(prompt="x", bad_words=["foo"]).bad_words == ["foo"]
