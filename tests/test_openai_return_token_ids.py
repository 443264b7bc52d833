"""vLLM's `return_token_ids` over HTTP, with the official openai client (extra_body): the prompt's token ids
and each choice's reply tokens beside the text. Streamed, the prompt's ids come in the first chunk (chat) or
each choice's first chunk (completions), and the chunks' token_ids add up to exactly the tokens the same
request returns whole, also where the tool-call parser holds text back. Agent training loops read them to
get the exact tokens a reply was sampled as (the request field was accepted and ignored before)."""

from __future__ import annotations

from typing import Any, Iterator

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from agentserve.testing import tiny_model_cached
from helpers.live_server import live_openai, server_root

MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city.",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}]
IDS = {"return_token_ids": True}


@pytest.fixture(scope="module")
def client() -> Iterator[openai.OpenAI]:
    with live_openai("qwen2", max_model_len=512) as c:
        yield c


def _tokenize(client: openai.OpenAI, **body: Any) -> list[int]:
    base = server_root(client)
    return httpx.post(f"{base}/tokenize", json={"model": "m", **body}, timeout=30).json()["tokens"]


def _chat_stream(client: openai.OpenAI, **kw: Any) -> tuple[list[Any], dict[int, list[int]]]:
    chunks = list(client.chat.completions.create(model="m", messages=MESSAGES, stream=True, extra_body=IDS, **kw))
    ids: dict[int, list[int]] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            ids.setdefault(choice.index, []).extend(choice.model_extra["token_ids"])
    return chunks, ids


@pytest.mark.parametrize("tools", [False, True])
def test_chat_returns_the_prompt_and_reply_token_ids_whole_and_streamed(client: openai.OpenAI, tools: bool) -> None:
    kw: dict[str, Any] = dict(max_tokens=24, temperature=0.9, seed=11, n=2)
    if tools:
        kw.update(tools=TOOLS, tool_choice="required")
    whole = client.chat.completions.create(model="m", messages=MESSAGES, extra_body=IDS, **kw)
    prompt = whole.model_extra["prompt_token_ids"]
    assert prompt == _tokenize(client, messages=MESSAGES, **({"tools": TOOLS} if tools else {}))
    replies = {c.index: c.model_extra["token_ids"] for c in whole.choices}
    assert sum(len(r) for r in replies.values()) == whole.usage.completion_tokens and all(replies.values())
    if not tools:
        tok = AutoTokenizer.from_pretrained(tiny_model_cached("qwen2"))
        for c in whole.choices:
            assert tok.decode(replies[c.index], skip_special_tokens=True) == c.message.content
    chunks, streamed = _chat_stream(client, **kw)
    assert streamed == replies  # the same seed: the same tokens, every one of them in some chunk
    assert chunks[0].model_extra["prompt_token_ids"] == prompt
    assert all(c.model_extra["token_ids"] == [] for chunk in chunks for c in chunk.choices if c.delta.role)
    assert all("prompt_token_ids" not in chunk.model_extra for chunk in chunks[1:])


def test_completions_return_each_choices_prompt_and_reply_token_ids(client: openai.OpenAI) -> None:
    prompts = ["The capital of France is", "Once upon a time"]
    kw: dict[str, Any] = dict(model="m", prompt=prompts, max_tokens=12, temperature=0.9, seed=5, n=2, extra_body=IDS)
    whole = client.completions.create(**kw)
    assert len(whole.choices) == 4
    for c in whole.choices:
        assert c.model_extra["prompt_token_ids"] == _tokenize(client, prompt=prompts[c.index // 2])
        assert len(c.model_extra["token_ids"]) == 12
    streamed: dict[int, list[int]] = {}
    prompt_ids: dict[int, list[list[int]]] = {}
    for chunk in client.completions.create(stream=True, **kw):
        for c in chunk.choices:
            streamed.setdefault(c.index, []).extend(c.model_extra["token_ids"])
            if "prompt_token_ids" in c.model_extra:
                prompt_ids.setdefault(c.index, []).append(c.model_extra["prompt_token_ids"])
    assert streamed == {c.index: c.model_extra["token_ids"] for c in whole.choices}
    assert prompt_ids == {c.index: [c.model_extra["prompt_token_ids"]] for c in whole.choices}  # once per choice


def test_without_the_flag_no_token_ids_are_added(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=4)
    assert "prompt_token_ids" not in (chat.model_extra or {})
    assert "token_ids" not in (chat.choices[0].model_extra or {})
    done = client.completions.create(model="m", prompt="hi", max_tokens=4)
    assert "token_ids" not in (done.choices[0].model_extra or {})
    for chunk in client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=4, stream=True):
        assert "prompt_token_ids" not in (chunk.model_extra or {})
        assert all("token_ids" not in (c.model_extra or {}) for c in chunk.choices)
