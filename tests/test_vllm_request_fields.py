"""vLLM's request fields as a vLLM client sends them: those agentserve implements behave as in vLLM,
and those it does not (beam search, custom logits processors, ...) are a 400 naming the
field, never silently dropped (the reply would look right and be something else)."""

from __future__ import annotations

from typing import Any, Iterator

import httpx
import pytest

from helpers.live_server import live_openai, server_root

MESSAGES = [{"role": "user", "content": "Say hi"}]


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with live_openai("qwen2", max_model_len=256) as client:
        base = server_root(client)
        with httpx.Client(base_url=base, timeout=30) as h:
            yield h


def _chat(http: httpx.Client, **fields: Any) -> httpx.Response:
    return http.post("/v1/chat/completions", json={"model": "m", "messages": MESSAGES, "max_tokens": 3,
                                                   "temperature": 0, **fields})


def _completion(http: httpx.Client, **fields: Any) -> httpx.Response:
    return http.post("/v1/completions", json={"model": "m", "prompt": "Hello there", "max_tokens": 3,
                                              "temperature": 0, **fields})


@pytest.mark.parametrize("fields, param", [
    ({"use_beam_search": True}, "use_beam_search"),
    ({"best_of": 3}, "best_of"),
    ({"guided_json": {"type": "object"}, "guided_whitespace_pattern": " "}, "guided_whitespace_pattern"),
    ({"structured_outputs": {"json": {"type": "object"}, "whitespace_pattern": " "}},
     "structured_outputs.whitespace_pattern"),
    ({"logits_processors": ["my_module.MyProcessor"]}, "logits_processors"),
    # vLLM V1's rule: a request may name the server's backend (llguidance here), not another one.
    ({"structured_outputs": {"json": {"type": "object"}, "backend": "xgrammar"}}, "structured_outputs.backend"),
    ({"guided_json": {"type": "object"}, "guided_decoding_backend": "outlines"}, "guided_decoding_backend"),
])
def test_chat_fields_agentserve_lacks_are_refused_by_name(http: httpx.Client, fields: dict, param: str) -> None:
    r = _chat(http, **fields)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and param in r.json()["error"]["message"]


@pytest.mark.parametrize("fields, param", [
    ({"use_beam_search": True}, "use_beam_search"),
    ({"prompt_embeds": "AAAA"}, "prompt_embeds"),
    ({"logits_processors": ["my_module.MyProcessor"]}, "logits_processors"),
])
def test_completion_fields_agentserve_lacks_are_refused_by_name(http: httpx.Client, fields: dict, param: str) -> None:
    r = _completion(http, **fields)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and param in r.json()["error"]["message"]


def test_vllm_defaults_of_those_fields_are_accepted(http: httpx.Client) -> None:
    """What vLLM's own clients send when the feature is off: no error."""
    off = {"use_beam_search": False, "length_penalty": 1.0, "logits_processors": None, "best_of": 1,
           "structural_tag": None, "guided_whitespace_pattern": None}
    assert _chat(http, **off).status_code == 200
    assert _completion(http, **off).status_code == 200
    for backend in ("auto", "guidance", "llguidance"):  # the server's own backend, by vLLM's names too
        assert _chat(http, structured_outputs={"choice": ["a", "b"], "backend": backend}).status_code == 200
        assert _chat(http, guided_choice=["a", "b"], guided_decoding_backend=backend).status_code == 200


PREFILLED = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello wor"}]


def _stream_text(http: httpx.Client, **fields: Any) -> str:
    import json
    text = ""
    with http.stream("POST", "/v1/chat/completions", json={"model": "m", "max_tokens": 3, "temperature": 0,
                                                           "stream": True, **fields}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    text += choice["delta"].get("content") or ""
    return text


def test_chat_echo_prepends_the_continued_assistant_message_as_vllm_does(http: httpx.Client) -> None:
    """vLLM's chat `echo`: the reply starts with the last message when it is the assistant's (the message
    continue_final_message continues); a last message of another role is not echoed."""
    cont = {"messages": PREFILLED, "add_generation_prompt": False, "continue_final_message": True}
    plain = _chat(http, **cont).json()["choices"][0]["message"]["content"]
    echoed = _chat(http, echo=True, **cont).json()["choices"][0]["message"]["content"]
    assert echoed == "Hello wor" + plain
    assert _stream_text(http, echo=True, **cont) == echoed
    user_last = _chat(http).json()["choices"][0]["message"]["content"]
    assert _chat(http, echo=True).json()["choices"][0]["message"]["content"] == user_last


def test_chat_documents_reach_the_chat_template() -> None:
    """vLLM's chat `documents` (RAG) go to the template as `documents`, as apply_chat_template takes them."""
    template = ("{% for d in documents or [] %}[doc {{ d.title }}: {{ d.text }}]{% endfor %}"
                "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>")
    docs = [{"title": "colors", "text": "red green blue yellow"}]
    with live_openai("qwen2", max_model_len=256, chat_template=template) as client:
        plain = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=1)
        with_docs = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=1,
                                                   extra_body={"documents": docs})
        as_kwargs = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=1,
                                                   extra_body={"chat_template_kwargs": {"documents": docs}})
    assert with_docs.usage.prompt_tokens == as_kwargs.usage.prompt_tokens > plain.usage.prompt_tokens


def test_chat_template_kwargs_override_the_template_arguments_as_in_vllm(http: httpx.Client) -> None:
    """vLLM lays chat_template_kwargs over its own arguments to apply_chat_template: add_generation_prompt and
    continue_final_message given there count as the request's fields, tools there is what the template shows;
    arguments that change what apply_chat_template returns are a 400 naming the key."""
    def ids(**fields: Any) -> list[int]:
        r = http.post("/tokenize", json={"model": "m", "messages": MESSAGES + [{"role": "assistant", "content": "He"}],
                                         **fields})
        assert r.status_code == 200, r.text
        return r.json()["tokens"]

    assert ids(add_generation_prompt=False) == ids(chat_template_kwargs={"add_generation_prompt": False})
    assert ids(add_generation_prompt=False, continue_final_message=True) == ids(
        chat_template_kwargs={"add_generation_prompt": False, "continue_final_message": True})
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}
    assert ids(tools=[tool]) == ids(chat_template_kwargs={"tools": [tool]}) != ids()
    r = _chat(http, chat_template_kwargs={"add_generation_prompt": False})
    assert r.status_code == 200, r.text
    for key, value in (("tokenize", True), ("add_generation_prompt", "no")):
        r = _chat(http, chat_template_kwargs={key: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == f"chat_template_kwargs.{key}", r.text
