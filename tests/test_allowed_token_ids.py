"""vLLM's allowed_token_ids: every sampled token is one of the request's list, for greedy and seeded random
rows beside unrestricted ones, exactly under speculation (greedy outputs identical with and without, the
target's mask at every scored position), validated against the vocabulary; over HTTP (vLLM's extra
field, through the official client) and gRPC (SamplingParams.allowed_token_ids, field 15)."""

from __future__ import annotations

import pytest

from agentserve import SamplingParams
from agentserve.errors import InvalidRequestError
from agentserve.llm import LLM
from agentserve.sampling_params import SamplingParamsError
from agentserve.testing import tiny_model_cached

PROMPTS = [[5, 6, 7, 8, 9, 10, 5, 6, 7, 8], [11, 12, 13, 14, 15, 11, 12, 13]]
ENGINE = dict(device="cpu", dtype="float32", block_size=4, num_blocks=64)
ALLOWED = [7, 19, 23, 101, 250, 311]


def _tokens(llm: LLM, params: list[SamplingParams]) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, params)]


def test_only_allowed_tokens_are_sampled_beside_unrestricted_rows() -> None:
    llm = LLM(str(tiny_model_cached("qwen2")), **ENGINE)
    greedy = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    plain = _tokens(llm, [greedy, greedy])
    restricted = _tokens(llm, [greedy.clone(allowed_token_ids=ALLOWED), greedy])
    assert all(t in ALLOWED for t in restricted[0]) and restricted[0] != plain[0]
    assert restricted[1] == plain[1]  # the other row is untouched
    seeded = greedy.clone(temperature=1.0, seed=5, allowed_token_ids=ALLOWED)
    first = _tokens(llm, [seeded, seeded.clone(allowed_token_ids=None)])
    assert all(t in ALLOWED for t in first[0]) and not all(t in ALLOWED for t in first[1])
    assert _tokens(llm, [seeded, seeded.clone(allowed_token_ids=None)]) == first
    with pytest.raises(InvalidRequestError, match="allowed_token_ids must be token ids in"):
        llm.generate(PROMPTS[:1], SamplingParams(allowed_token_ids=[10**7]))
    llm.close()


@pytest.mark.parametrize("proposer", ["ngram", "self"])
def test_exact_under_speculation(proposer: str) -> None:
    target = str(tiny_model_cached("llama3"))
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, allowed_token_ids=ALLOWED + [5, 6, 8])
    plain = LLM(target, **ENGINE)
    want = _tokens(plain, [params, params])
    plain.close()
    spec = dict(speculative_method="ngram", prompt_lookup_min=1) if proposer == "ngram" else dict(draft_model=target)
    llm = LLM(target, num_speculative_tokens=3, spec_dynamic=False, **spec, **ENGINE)
    assert _tokens(llm, [params, params]) == want
    assert llm.engine.metrics.spec_num_draft_tokens > 0
    seeded = params.clone(temperature=1.0, seed=3)
    out = _tokens(llm, [seeded, seeded])
    assert all(t in seeded.allowed_token_ids for row in out for t in row)
    llm.close()


def test_allowed_token_ids_are_validated() -> None:
    for bad in ([], [-1], [1.5], "12"):
        with pytest.raises(SamplingParamsError, match="allowed_token_ids must be a non-empty list"):
            SamplingParams(allowed_token_ids=bad)
