"""Tool calls and response_format through the official `openai` client, on each tiny model's
tool-call format (Hermes/Qwen tags, Llama 3.1 JSON, Mistral [TOOL_CALLS] [...], and Mistral's
`[TOOL_CALLS]name[ARGS]{...}` from tokenizer v11 on, through that chat template on the tiny Mistral model). The tiny models have
random weights: only the grammar makes their calls valid, so every call validating shows the
constraint at work end to end (HTTP fields -> SamplingParams -> grammar -> parser -> OpenAI shapes)."""

from __future__ import annotations

import json
from typing import Any, Iterator

import jsonschema
import openai
import pytest

from agentserve.adapters.openai.app import create_app
from agentserve.adapters.openai.server import ServerThread
from agentserve.config import EngineConfig
from agentserve.engine.async_engine import AsyncEngine
from agentserve.engine.engine import Engine
from agentserve.testing.tiny import tiny_model_cached
from mistral_v11_template import MISTRAL_V11_TEMPLATE

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
LOOKUP = {"type": "function", "function": {
    "name": "lookup", "description": "Look up a record.",
    "parameters": {"type": "object", "properties": {
        "table": {"type": "string", "enum": ["users", "orders"]},
        "exact": {"type": "boolean"}},
        "required": ["table", "exact"], "additionalProperties": False}}}
TOOLS = [WEATHER, LOOKUP]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
MESSAGES = [{"role": "system", "content": "You can call tools."},
            {"role": "user", "content": "What is the weather in Paris, in celsius?"}]
SEEDS = (0, 1, 2)
MAX_TOKENS = 160


@pytest.fixture(scope="module", params=["qwen2", "llama3", "mistral", "mistral_v11"])
def client(request: pytest.FixtureRequest) -> Iterator[openai.OpenAI]:
    arch = request.param
    template = {"chat_template": MISTRAL_V11_TEMPLATE} if arch == "mistral_v11" else {}
    config = EngineConfig.from_kwargs(str(tiny_model_cached(arch.replace("_v11", ""))), device="cpu", num_blocks=1024,
                                      served_model_name=f"tiny-{arch}", max_model_len=2048, **template)
    aeng = AsyncEngine(Engine(config))
    server = ServerThread(create_app(aeng, config)).start()
    yield openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
    server.stop()
    aeng.shutdown()


def _model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def _check_calls(calls: Any, allowed: set[str]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for call in calls or []:
        assert call.type == "function" and call.id
        name = call.function.name
        assert name in allowed, name
        args = json.loads(call.function.arguments)
        jsonschema.validate(args, SCHEMAS[name])
        out.append((name, args))
    return out


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def _reassemble(chunks: list[Any], truncated_ok: bool = False
                ) -> tuple[str, list[tuple[str, dict[str, Any]]], list[str], str]:
    """Streamed deltas -> (content, [(name, args)], ids, finish_reason), as an OpenAI client does it.
    With truncated_ok, a last call whose fragments were cut off by max_tokens is left out."""
    content = ""
    calls: dict[int, dict[str, Any]] = {}
    finish = ""
    for ch in chunks:
        for c in ch.choices:
            d = c.delta
            content += d.content or ""
            for tc in d.tool_calls or []:
                slot = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                if tc.id:
                    assert slot["id"] is None, "a call's id comes once, in its first fragment"
                    slot["id"] = tc.id
                if tc.function and tc.function.name:
                    slot["name"] += tc.function.name
                if tc.function and tc.function.arguments:
                    slot["arguments"] += tc.function.arguments
            if c.finish_reason:
                finish = c.finish_reason
    ordered = [calls[i] for i in sorted(calls)]
    assert sorted(calls) == list(range(len(calls))), "call indexes are 0, 1, ..."
    if truncated_ok and finish == "length" and ordered:
        try:
            json.loads(ordered[-1]["arguments"])
        except json.JSONDecodeError:
            ordered = ordered[:-1]
    parsed = [(c["name"], json.loads(c["arguments"])) for c in ordered]
    for name, args in parsed:
        jsonschema.validate(args, SCHEMAS[name])
    return content, parsed, [c["id"] for c in ordered], finish


@pytest.mark.parametrize("seed", SEEDS)
def test_tool_choice_required(client: openai.OpenAI, seed: int) -> None:
    # One call per reply: a random-weight model would otherwise keep appending calls up to max_tokens.
    kw = dict(model=_model(client), messages=MESSAGES, tools=TOOLS, tool_choice="required", max_tokens=MAX_TOKENS,
              temperature=1.0, seed=seed, parallel_tool_calls=False)
    out = client.chat.completions.create(**kw)
    choice = out.choices[0]
    calls = _check_calls(choice.message.tool_calls, set(SCHEMAS))
    assert calls, f"no tool call: {choice.message.content!r} ({choice.finish_reason})"
    assert choice.finish_reason == "tool_calls"
    assert not choice.message.content
    # Streaming the same seeded request: the fragments reassemble to the same calls.
    content, streamed, ids, finish = _reassemble(list(client.chat.completions.create(stream=True, **kw)))
    assert streamed == calls and all(ids) and finish == "tool_calls" and not content


@pytest.mark.parametrize("seed", SEEDS)
def test_tool_choice_named(client: openai.OpenAI, seed: int) -> None:
    kw = dict(model=_model(client), messages=MESSAGES, tools=TOOLS, max_tokens=MAX_TOKENS, temperature=1.0, seed=seed,
              tool_choice={"type": "function", "function": {"name": "lookup"}})
    out = client.chat.completions.create(**kw)
    calls = _check_calls(out.choices[0].message.tool_calls, {"lookup"})
    # One call of the named tool, parallel_tool_calls left on (vLLM's answer to a named tool_choice).
    assert len(calls) == 1 and calls[0][0] == "lookup"
    assert out.choices[0].finish_reason == "stop"  # OpenAI: a forced function ends with "stop"
    _, streamed, _, finish = _reassemble(list(client.chat.completions.create(stream=True, **kw)))
    assert streamed == calls and finish == "stop"


@pytest.mark.parametrize("seed", SEEDS)
def test_tool_choice_auto(client: openai.OpenAI, seed: int) -> None:
    kw = dict(model=_model(client), messages=MESSAGES, tools=TOOLS, max_tokens=MAX_TOKENS, temperature=1.0, seed=seed)
    out = client.chat.completions.create(**kw)
    choice = out.choices[0]
    calls = _check_calls(choice.message.tool_calls, set(SCHEMAS))  # whatever it calls is valid
    if calls:
        assert choice.finish_reason == "tool_calls"
    content, streamed, _, _ = _reassemble(list(client.chat.completions.create(stream=True, **kw)))
    assert streamed == calls
    assert (content or None) == (choice.message.content or None)


def test_parallel_calls_validate(client: openai.OpenAI) -> None:
    """parallel_tool_calls left on: the model may emit several calls; each one returned validates, and
    a reply cut off by max_tokens says "length"."""
    model = _model(client)
    for seed in SEEDS:
        kw = dict(model=model, messages=MESSAGES, tools=TOOLS, tool_choice="required", max_tokens=MAX_TOKENS,
                  temperature=1.0, seed=seed)
        out = client.chat.completions.create(**kw)
        choice = out.choices[0]
        returned = list(choice.message.tool_calls or [])
        partial = None
        if choice.finish_reason == "length" and returned and not _parses(returned[-1].function.arguments):
            partial = returned.pop()  # issue #14: a call cut off by max_tokens comes back as far as it got
        calls = _check_calls(returned, set(SCHEMAS))
        assert choice.finish_reason in ("tool_calls", "length")
        if choice.finish_reason == "tool_calls":
            assert calls
        chunks = list(client.chat.completions.create(stream=True, **kw))
        _, streamed, _, finish = _reassemble(chunks, truncated_ok=True)
        assert finish == choice.finish_reason
        # The complete calls match; a call cut off mid-way is streamed and returned alike, in part.
        assert streamed[:len(calls)] == calls
        if partial is not None:
            fragments = "".join(tc.function.arguments or "" for ch in chunks for c in ch.choices
                                for tc in c.delta.tool_calls or [] if tc.index == len(returned) and tc.function)
            assert fragments == partial.function.arguments


def test_parallel_tool_calls_false_and_round_trip(client: openai.OpenAI) -> None:
    model = _model(client)
    for seed in SEEDS:
        out = client.chat.completions.create(model=model, messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                             parallel_tool_calls=False, max_tokens=MAX_TOKENS, seed=seed)
        calls = out.choices[0].message.tool_calls or []
        assert len(calls) == 1
        _check_calls(calls, set(SCHEMAS))
    # The agent loop: the call goes back with its result, the model answers (here: anything valid).
    call = calls[0]
    follow = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function",
             "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21})}]
    again = client.chat.completions.create(model=model, messages=follow, tools=TOOLS, max_tokens=8, seed=0)
    assert again.usage.prompt_tokens > out.usage.prompt_tokens
    _check_calls(again.choices[0].message.tool_calls, set(SCHEMAS))


def test_tool_choice_none_is_plain_text(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(model=_model(client), messages=MESSAGES, tools=TOOLS, tool_choice="none",
                                         max_tokens=10, temperature=0)
    assert not out.choices[0].message.tool_calls
    assert out.choices[0].finish_reason in ("stop", "length")


RESPONSE_SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"type": "string", "maxLength": 16},
        "confidence": {"type": "string", "enum": ["low", "medium", "high"]},
        "sources": {"type": "array", "items": {"type": "string", "enum": ["web", "docs", "memory"]}, "maxItems": 3},
        "final": {"type": "boolean"},
    },
    "required": ["answer", "confidence", "sources", "final"],
    "additionalProperties": False,
}


def test_response_format_json_schema_always_validates(client: openai.OpenAI) -> None:
    model = _model(client)
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": RESPONSE_SCHEMA, "strict": True}}
    for seed in range(8):
        out = client.chat.completions.create(model=model, messages=MESSAGES, response_format=fmt,
                                             max_tokens=MAX_TOKENS, temperature=1.0, seed=seed)
        choice = out.choices[0]
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), RESPONSE_SCHEMA)
    # Streamed: the concatenated deltas validate too.
    chunks = list(client.chat.completions.create(model=model, messages=MESSAGES, response_format=fmt,
                                                 max_tokens=MAX_TOKENS, temperature=1.0, seed=99, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), RESPONSE_SCHEMA)
    # The legacy completions endpoint takes response_format as well (vLLM extra).
    comp = client.completions.create(model=model, prompt="JSON:", max_tokens=MAX_TOKENS, seed=5,
                                     extra_body={"response_format": fmt})
    jsonschema.validate(json.loads(comp.choices[0].text), RESPONSE_SCHEMA)


def test_response_format_json_object(client: openai.OpenAI) -> None:
    for seed in range(3):
        out = client.chat.completions.create(model=_model(client), messages=MESSAGES, max_tokens=MAX_TOKENS,
                                             response_format={"type": "json_object"}, temperature=1.0, seed=seed)
        if out.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(out.choices[0].message.content), dict)
        else:  # an unbounded object may run out of tokens; it is then reported as "length"
            assert out.choices[0].finish_reason == "length"


# Parameters whose '#/...' references point into themselves (pydantic's $defs, draft-4 definitions, the
# root '#' of a recursive type): inside the call object the grammar compiles, they must still resolve there.
REF_TOOLS = [
    {"type": "function", "function": {"name": "move", "parameters": {
        "type": "object", "$defs": {"Point": {"type": "object", "properties": {"x": {"type": "integer"}},
                                              "required": ["x"], "additionalProperties": False}},
        "properties": {"to": {"$ref": "#/$defs/Point"}}, "required": ["to"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "tag", "parameters": {
        "type": "object", "definitions": {"Tag": {"type": "string", "enum": ["a", "b"]}},
        "properties": {"tag": {"$ref": "#/definitions/Tag"}}, "required": ["tag"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "tree", "parameters": {
        "type": "object", "properties": {"leaf": {"type": "boolean"}, "child": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}},
        "required": ["leaf", "child"], "additionalProperties": False}}},
]


def test_tool_parameters_with_local_refs(client: openai.OpenAI) -> None:
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in REF_TOOLS}
    for tool in REF_TOOLS:  # each tool named: every one of them compiles and its calls validate
        name = tool["function"]["name"]
        checked = 0
        for seed in SEEDS:
            out = client.chat.completions.create(model=_model(client), messages=MESSAGES, tools=REF_TOOLS, seed=seed,
                                                 tool_choice={"type": "function", "function": {"name": name}},
                                                 max_tokens=MAX_TOKENS, temperature=1.0)
            calls = out.choices[0].message.tool_calls or []
            if out.choices[0].finish_reason == "length":  # a random model may nest `tree` past max_tokens
                continue
            assert [c.function.name for c in calls] == [name]
            jsonschema.validate(json.loads(calls[0].function.arguments), schemas[name])
            checked += 1
        assert checked, f"every call of {name} ran out of tokens"
