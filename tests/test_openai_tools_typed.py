"""Chat Completions with what agent frameworks send on their typed paths (issue #14): tools together
with response_format (calls, or a final answer matching the schema), tool_choice allowed_tools, the
legacy functions / function_call fields, enum values coerced to their declared type, and a tool call
cut off by max_tokens returned as far as it got in both modes."""

from __future__ import annotations

import json
from typing import Any, Iterator

import httpx
import jsonschema
import openai
import pytest

from agentserve.adapters.openai.app import create_app
from agentserve.adapters.openai.server import ServerThread
from agentserve.config import EngineConfig
from agentserve.engine.async_engine import AsyncEngine
from agentserve.engine.engine import Engine
from agentserve.grammar.tool_schema import normalize_tool_schema
from agentserve.testing.tiny import tiny_model_cached

MODEL = "tiny-llama3"
SEARCH = {"type": "object", "properties": {"query": {"type": "string", "enum": ["cats", "dogs"]}},
          "required": ["query"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "search", "parameters": SEARCH}},
         {"type": "function", "function": {"name": "noop", "parameters": {"type": "object", "properties": {},
                                                                           "additionalProperties": False}}}]
NOTE = {"type": "function", "function": {"name": "note", "parameters": {
    "type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"], "additionalProperties": False}}}
ANSWER = {"type": "object", "properties": {"verdict": {"type": "boolean"}}, "required": ["verdict"],
          "additionalProperties": False}
MESSAGES = [{"role": "user", "content": "Find something about cats."}]


@pytest.fixture(scope="module", params=["llama3", "qwen2"])  # llama3_json (bare JSON calls) and hermes
def client(request: Any) -> Iterator[openai.OpenAI]:
    config = EngineConfig.from_kwargs(str(tiny_model_cached(request.param)), device="cpu", num_blocks=512,
                                      served_model_name=MODEL, max_model_len=1024)
    aeng = AsyncEngine(Engine(config))
    server = ServerThread(create_app(aeng, config)).start()
    yield openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    server.stop()
    aeng.shutdown()


def _stream(client: openai.OpenAI, **kw: Any) -> tuple[str, dict[int, dict[str, str]], str]:
    content, calls, finish = "", {}, ""
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            content += c.delta.content or ""
            for tc in c.delta.tool_calls or []:
                slot = calls.setdefault(tc.index, {"name": "", "arguments": ""})
                slot["name"] += (tc.function.name or "") if tc.function else ""
                slot["arguments"] += (tc.function.arguments or "") if tc.function else ""
            finish = c.finish_reason or finish
    return content, calls, finish


@pytest.mark.parametrize("kind", ["json_schema", "json_object"])
def test_tools_with_response_format(client: openai.OpenAI, kind: str) -> None:
    response_format: dict[str, Any] = {"type": "json_object"} if kind == "json_object" else \
        {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER, "strict": True}}
    answers = calls_seen = 0
    for seed in range(6):
        kw = dict(model=MODEL, messages=MESSAGES, tools=TOOLS, response_format=response_format, max_tokens=80,
                  temperature=1.0, seed=seed)
        out = client.chat.completions.create(**kw)
        choice = out.choices[0]
        if choice.finish_reason == "length":
            continue
        if choice.message.tool_calls:
            calls_seen += 1
            assert choice.finish_reason == "tool_calls"
            for call in choice.message.tool_calls:
                args = json.loads(call.function.arguments)
                if call.function.name == "search":
                    jsonschema.validate(args, SEARCH)
        else:
            answers += 1
            value = json.loads(choice.message.content)
            jsonschema.validate(value, ANSWER if kind == "json_schema" else {"type": "object"})
        content, streamed, finish = _stream(client, **kw)  # the same seeded request, streamed
        assert finish == choice.finish_reason
        assert [c["name"] for _, c in sorted(streamed.items())] == \
            [c.function.name for c in choice.message.tool_calls or []]
        assert (content or None) == (choice.message.content or None)
    if kind == "json_schema":  # a random model may ramble in an unbounded json_object until max_tokens
        assert answers + calls_seen > 0


def test_tools_with_response_format_required_calls(client: openai.OpenAI) -> None:
    """tool_choice "required" with a response_format: the call comes first (the framework asks for
    the typed answer on a later turn with tool_choice "auto")."""
    out = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": ANSWER}}, max_tokens=80,
        temperature=0)
    calls = out.choices[0].message.tool_calls
    assert calls and out.choices[0].finish_reason == "tool_calls"


def test_allowed_tools(client: openai.OpenAI) -> None:
    allowed = {"type": "allowed_tools", "allowed_tools": {"mode": "required",
                                                           "tools": [{"type": "function", "function": {"name": "noop"}}]}}
    for seed in range(3):
        out = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice=allowed,
                                             parallel_tool_calls=False, max_tokens=60, temperature=1.0, seed=seed)
        calls = out.choices[0].message.tool_calls
        assert calls and all(c.function.name == "noop" for c in calls)
    bad = {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": [{"type": "function",
                                                                               "function": {"name": "nope"}}]}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice=bad, max_tokens=4)
    assert e.value.body["param"] == "tool_choice.allowed_tools.tools[0]"


def _said(message: Any) -> tuple[Any, ...]:
    """A reply's content and its call, in either shape (tool_calls, or legacy function_call)."""
    call = message.function_call or (message.tool_calls[0].function if message.tool_calls else None)
    return message.content, (call.name, call.arguments) if call is not None else None


def test_legacy_functions_answer_in_their_own_shape(client: openai.OpenAI) -> None:
    """A request with the legacy `functions` gets its call as `message.function_call` (one call; streamed as
    `delta.function_call`, the name first), never as tool_calls, which such clients do not read."""
    fn = TOOLS[0]["function"]
    kw: dict[str, Any] = dict(model=MODEL, messages=MESSAGES, functions=[fn], function_call={"name": "search"},
                              max_tokens=60, temperature=0)
    out = client.chat.completions.create(**kw)
    message = out.choices[0].message
    assert message.tool_calls is None and message.function_call is not None and message.function_call.name == "search"
    jsonschema.validate(json.loads(message.function_call.arguments), SEARCH)
    assert out.choices[0].finish_reason == "stop"  # a named function, as a named tool_choice
    name, arguments, finish, first = "", "", "", None
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            assert not c.delta.tool_calls
            if c.delta.function_call is not None:
                first = first or c.delta.function_call
                name += c.delta.function_call.name or ""
                arguments += c.delta.function_call.arguments or ""
            finish = c.finish_reason or finish
    assert first is not None and first.name == "search"
    assert (name, arguments, finish) == ("search", message.function_call.arguments, "stop")
    # Unforced (with a typed answer beside the function, which makes this random model call it), a reply that
    # calls ends with finish_reason "function_call" (what "tool_calls" is for tools).
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER, "strict": True}}
    calls = 0
    for seed in range(4):
        auto = client.chat.completions.create(model=MODEL, messages=MESSAGES, functions=[fn], response_format=fmt,
                                              max_tokens=80, temperature=1.0, seed=seed).choices[0]
        assert auto.message.tool_calls is None
        if auto.message.function_call is not None:
            calls += 1
            assert auto.finish_reason == "function_call"
    assert calls > 0


def test_legacy_conversations_render_as_tool_calls(client: openai.OpenAI) -> None:
    """An assistant's legacy function_call and the function message with its result render exactly as the
    same call and result in the tools form do (same prompt, same reply)."""
    call = {"name": "search", "arguments": '{"query": "cats"}'}
    legacy = MESSAGES + [{"role": "assistant", "content": None, "function_call": call},
                         {"role": "function", "name": "search", "content": "Cats sleep a lot."}]
    tools_form = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "fn0000000", "type": "function", "function": call}]},
        {"role": "tool", "tool_call_id": "fn0000000", "name": "search", "content": "Cats sleep a lot."}]
    a = client.chat.completions.create(model=MODEL, messages=legacy, functions=[TOOLS[0]["function"]], max_tokens=12,
                                       temperature=0)
    b = client.chat.completions.create(model=MODEL, messages=tools_form, tools=[TOOLS[0]], parallel_tool_calls=False,
                                       max_tokens=12, temperature=0)
    assert a.usage.prompt_tokens == b.usage.prompt_tokens and _said(a.choices[0].message) == _said(b.choices[0].message)
    empty = legacy[:-1] + [{"role": "function", "name": "search", "content": None}]  # OpenAI allows a null result
    assert client.chat.completions.create(model=MODEL, messages=empty, functions=[TOOLS[0]["function"]], max_tokens=2)


def test_legacy_fields_bad_requests_name_the_field(client: openai.OpenAI) -> None:
    http = httpx.Client(base_url=str(client.base_url).rsplit("/v1", 1)[0], timeout=120)
    fn = TOOLS[0]["function"]
    cases = [
        (dict(functions=[fn], tools=TOOLS), "functions"),  # the legacy form and the current one together
        (dict(function_call="auto"), "function_call"),  # without functions
        (dict(functions=[fn], function_call={"nom": "search"}), "function_call"),
        (dict(messages=MESSAGES + [{"role": "function", "content": "x"}]), "messages[1].name"),
        (dict(messages=MESSAGES + [{"role": "assistant", "function_call": "search"}]), "messages[1].function_call"),
    ]
    for kw, param in cases:
        resp = http.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, "max_tokens": 4, **kw})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == param, (kw, resp.text)


def test_truncated_call_is_returned_in_part(client: openai.OpenAI) -> None:
    # A random model's string argument never ends by itself: max_tokens cuts it off mid-call.
    kw = dict(model=MODEL, messages=MESSAGES, tools=[NOTE], tool_choice={"type": "function", "function": {"name": "note"}},
              max_tokens=30, temperature=0)
    out = client.chat.completions.create(**kw)
    choice = out.choices[0]
    assert choice.finish_reason == "length"
    calls = choice.message.tool_calls
    assert calls and calls[0].function.name == "note" and '"text"' in calls[0].function.arguments
    _, streamed, finish = _stream(client, **kw)
    assert finish == "length" and streamed[0]["arguments"] == calls[0].function.arguments


def test_bfcl_integer_enum_of_strings_is_accepted(client: openai.OpenAI) -> None:
    params = {"type": "object", "properties": {"n": {"type": "integer", "enum": ["1", "2"]}}, "required": ["n"],
              "additionalProperties": False}
    assert normalize_tool_schema(params)["properties"]["n"]["enum"] == [1, 2]
    out = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=40, temperature=0,
                                         tools=[{"type": "function", "function": {"name": "pick", "parameters": params}}],
                                         tool_choice="required", parallel_tool_calls=False)
    calls = out.choices[0].message.tool_calls
    assert calls and json.loads(calls[0].function.arguments)["n"] in (1, 2)
