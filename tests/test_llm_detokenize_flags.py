"""vLLM's detokenize and spaces_between_special_tokens sampling fields (vLLM's benchmark scripts pass
detokenize): detokenize=False gives the same token ids with no text, logprobs without decoded_token, and
refuses stop strings; spaces_between_special_tokens=False decodes as the tokenizer does with that option."""

from __future__ import annotations

import pytest

from agentserve import SamplingParams
from agentserve.llm import LLM
from agentserve.sampling_params import SamplingParamsError
from agentserve.testing import tiny_model_cached

PROMPT = "hello world"
GREEDY = dict(temperature=0.0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(str(tiny_model_cached("llama")), device="cpu", max_model_len=256)


def test_detokenize_false_gives_token_ids_without_text(llm: LLM) -> None:
    with_text, without = llm.generate([PROMPT, PROMPT], [
        SamplingParams(logprobs=2, prompt_logprobs=1, **GREEDY),
        SamplingParams(logprobs=2, prompt_logprobs=1, detokenize=False, **GREEDY)])
    assert with_text.outputs[0].text and without.outputs[0].text == ""
    assert without.outputs[0].token_ids == with_text.outputs[0].token_ids
    positions = without.outputs[0].logprobs
    assert positions is not None and all(e.decoded_token is None for p in positions for e in p.values())
    assert without.prompt_logprobs is not None
    assert all(e.decoded_token is None for p in without.prompt_logprobs if p is not None for e in p.values())
    assert with_text.outputs[0].logprobs is not None
    assert all(e.decoded_token is not None for p in with_text.outputs[0].logprobs for e in p.values())


def test_detokenize_true_is_accepted_as_vllm_scripts_pass_it(llm: LLM) -> None:
    out = llm.generate(PROMPT, SamplingParams(detokenize=True, spaces_between_special_tokens=True, **GREEDY))[0]
    assert out.outputs[0].text == llm.generate(PROMPT, SamplingParams(**GREEDY))[0].outputs[0].text


def test_stop_strings_need_detokenize() -> None:
    with pytest.raises(SamplingParamsError, match="detokenize=True") as info:
        SamplingParams(stop=["x"], detokenize=False)
    assert info.value.field == "stop"


def test_spaces_between_special_tokens_false_decodes_as_the_tokenizer(llm: LLM) -> None:
    tok = llm.tokenizer
    specials = [t for t in sorted(tok.added_tokens_decoder) if t not in llm.engine.eos_token_ids][:3]
    params = SamplingParams(allowed_token_ids=specials, skip_special_tokens=False, spaces_between_special_tokens=False,
                            **GREEDY)
    out = llm.generate(PROMPT, params)[0].outputs[0]
    assert set(out.token_ids) <= set(specials)
    assert out.text == tok.decode(out.token_ids, skip_special_tokens=False, spaces_between_special_tokens=False)
