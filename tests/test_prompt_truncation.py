"""vLLM's truncate_prompt_tokens (keep the prompt's last k tokens; -1: what the model can take) offline and
over HTTP, and the endpoints' add_special_tokens (completions: the tokenizer's BOS by default; chat: off,
the template places it)."""

from __future__ import annotations

from typing import Iterator

import openai
import pytest

from agentserve import SamplingParams
from agentserve.llm import LLM
from agentserve.sampling_params import SamplingParamsError
from agentserve.testing import tiny_model_cached
from helpers.live_server import live_openai

PROMPT = list(range(20, 60))


def test_offline_truncation_keeps_the_last_tokens() -> None:
    llm = LLM(str(tiny_model_cached("llama3")), device="cpu", dtype="float32", max_model_len=32, num_blocks=64)
    greedy = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    short = llm.generate([PROMPT[-6:]], greedy)[0]
    cut = llm.generate([PROMPT], greedy.clone(truncate_prompt_tokens=6))[0]
    assert cut.prompt_token_ids == PROMPT[-6:] and cut.outputs[0].token_ids == short.outputs[0].token_ids
    # -1: as much as max_model_len takes with room for an output token (40 tokens do not fit in 32).
    whole = llm.generate([PROMPT], greedy.clone(truncate_prompt_tokens=-1, max_tokens=1))[0]
    assert whole.prompt_token_ids == PROMPT[-31:] and len(whole.outputs[0].token_ids) == 1
    llm.close()
    for bad in (0, -2, 1.5):
        with pytest.raises(SamplingParamsError, match="truncate_prompt_tokens must be"):
            SamplingParams(truncate_prompt_tokens=bad)


@pytest.fixture(scope="module")
def client() -> Iterator[openai.OpenAI]:
    with live_openai("llama3", max_model_len=256) as c:
        yield c


def test_http_truncation_and_special_tokens(client: openai.OpenAI) -> None:
    text = "one two three four five six seven eight nine ten " * 40  # past max_model_len
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model="m", prompt=text, max_tokens=2)
    out = client.completions.create(model="m", prompt=text, max_tokens=2, extra_body={"truncate_prompt_tokens": 16},
                                    echo=True)
    assert out.usage.prompt_tokens == 16
    echoed = out.choices[0].text  # the 16 tokens the model saw (a tail of the text), then 2 generated
    assert "eight nine ten" in echoed and not echoed.startswith("one two") and len(echoed) < len(text) // 4
    chat = client.chat.completions.create(model="m", messages=[{"role": "user", "content": text}], max_tokens=2,
                                          extra_body={"truncate_prompt_tokens": 20})
    assert chat.usage.prompt_tokens == 20
    with_bos = client.completions.create(model="m", prompt="hello there", max_tokens=1)
    without = client.completions.create(model="m", prompt="hello there", max_tokens=1,
                                        extra_body={"add_special_tokens": False})
    assert with_bos.usage.prompt_tokens == without.usage.prompt_tokens + 1  # llama3's BOS
    plain_chat = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    doubled = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=1,
                                             extra_body={"add_special_tokens": True})
    assert doubled.usage.prompt_tokens == plain_chat.usage.prompt_tokens + 1
    with pytest.raises(openai.BadRequestError, match="truncate_prompt_tokens"):
        client.completions.create(model="m", prompt="x", extra_body={"truncate_prompt_tokens": 0})
