"""OpenAI's logit_bias: added to the target's logits before penalties, masks and sampling, for greedy and
random rows alike, at every position a speculative verification scores (outputs identical with and without
speculation), and validated (ids in the vocabulary, values in [-100, 100])."""

from __future__ import annotations

import pytest
import torch

from agentserve import SamplingParams
from agentserve.errors import InvalidRequestError
from agentserve.llm import LLM
from agentserve.sampling.sampler import Sampler, SamplingMetadata
from agentserve.sampling_params import SamplingParamsError
from agentserve.testing import tiny_model_cached

PROMPTS = [[5, 6, 7, 8, 9, 10, 5, 6, 7, 8], [11, 12, 13, 14, 15, 11, 12, 13]]
ENGINE = dict(device="cpu", dtype="float32", block_size=4, num_blocks=64)


def _tokens(llm: LLM, params: SamplingParams) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, params)]


def test_sampler_adds_the_bias_per_row() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [0.0, 3.0, 1.0, 2.0]])
    meta = SamplingMetadata(temperature=torch.zeros(2), all_greedy=True, top_k=None, top_p=None, min_p=None,
                            generators={}, bias_rows=torch.tensor([0, 1]), bias_tokens=torch.tensor([2, 1]),
                            bias_values=torch.tensor([2.5, -100.0]))
    assert Sampler()(logits, meta).sampled_token_ids.tolist() == [2, 3]


def test_engine_greedy_bias_forces_and_bans() -> None:
    llm = LLM(str(tiny_model_cached("qwen2")), **ENGINE)
    base = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    plain = _tokens(llm, base)
    forced = _tokens(llm, base.clone(logit_bias={42: 100.0}))
    assert forced == [[42] * 8, [42] * 8]
    banned = {t: -100.0 for out in plain for t in out}
    assert all(t not in banned for out in _tokens(llm, base.clone(logit_bias=banned)) for t in out)
    llm.close()


@pytest.mark.parametrize("proposer", ["ngram", "self"])
def test_bias_is_exact_under_speculation(proposer: str) -> None:
    target = str(tiny_model_cached("llama3"))
    # Moderate biases that move some greedy choices, not all: the verification must apply them at every
    # scored position for the outputs to match.
    bias = {t: (4.0 if t % 3 == 0 else -4.0) for t in range(5, 60)}
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logit_bias=bias)
    plain = LLM(target, **ENGINE)
    want = _tokens(plain, params)
    unbiased = _tokens(plain, params.clone(logit_bias=None))
    assert want != unbiased  # the bias matters
    plain.close()
    spec = dict(speculative_method="ngram", prompt_lookup_min=1) if proposer == "ngram" else dict(draft_model=target)
    llm = LLM(target, num_speculative_tokens=3, spec_dynamic=False, **spec, **ENGINE)
    assert _tokens(llm, params) == want
    assert llm.engine.metrics.spec_num_draft_tokens > 0
    seeded = params.clone(temperature=1.0, seed=3, logit_bias={t: -100.0 for t in range(0, 200, 2)})
    first, again = _tokens(llm, seeded), _tokens(llm, seeded)
    assert first == again and all(t % 2 == 1 or t >= 200 for out in first for t in out)
    llm.close()


def test_bias_is_validated() -> None:
    with pytest.raises(SamplingParamsError, match="logit_bias values must be in"):
        SamplingParams(logit_bias={1: 150.0})
    with pytest.raises(SamplingParamsError, match="keys must be token ids"):
        SamplingParams(logit_bias={-1: 1.0})
    llm = LLM(str(tiny_model_cached("qwen2")), **ENGINE)
    with pytest.raises(InvalidRequestError, match="logit_bias keys must be token ids in"):
        llm.generate(PROMPTS[:1], SamplingParams(max_tokens=2, logit_bias={10**7: 1.0}))
    llm.close()
