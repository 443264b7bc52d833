"""Edge cases of the OpenAI-compatible API found by driving it as a client would, on a live tiny model:
each test is a request shape that once hung or broke the response."""

from __future__ import annotations

from typing import Iterator

import openai
import pytest

from helpers.live_server import live_openai

MESSAGES = [{"role": "user", "content": "Name three colors of the rainbow."}]


@pytest.fixture(scope="module")
def client() -> Iterator[openai.OpenAI]:
    with live_openai("qwen2", max_model_len=512) as c:
        yield c.with_options(timeout=20)  # a request that hangs fails the test instead of blocking it


def test_n_with_sequences_finishing_on_their_first_token(client: openai.OpenAI) -> None:
    """n > 1 where the first sequence finishes on its first token (max_tokens=1 here; an EOS or a stop
    string there does the same): the other sequences must still run, and the request must finish."""
    out = client.chat.completions.create(model="m", messages=MESSAGES, n=3, max_tokens=1, temperature=1.0, seed=7)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in out.choices) and out.usage.completion_tokens == 3
    comp = client.completions.create(model="m", prompt=["Hello", "Good morning"], n=2, max_tokens=1)
    assert len(comp.choices) == 4 and comp.usage.completion_tokens == 4
    reasons = {c.index: c.finish_reason for ch in client.completions.create(model="m", prompt="Hello", n=2,
                                                                           max_tokens=1, stream=True)
               for c in ch.choices if c.finish_reason}
    assert reasons == {0: "length", 1: "length"}


def test_null_openai_fields_mean_their_defaults(client: openai.OpenAI) -> None:
    """Fields OpenAI's API declares nullable, sent as null by clients that serialize every optional field
    (n, stream, logprobs, the penalties, parallel_tool_calls; echo on completions): their defaults."""
    nulls = dict(n=None, stream=None, logprobs=None, presence_penalty=None, frequency_penalty=None)
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    out = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=2, tools=[tool],
                                         extra_body=dict(nulls, parallel_tool_calls=None))
    assert len(out.choices) == 1 and out.choices[0].logprobs is None
    comp = client.completions.create(model="m", prompt="Hello", max_tokens=2, extra_body=dict(nulls, echo=None))
    assert len(comp.choices) == 1 and comp.usage.completion_tokens == 2
