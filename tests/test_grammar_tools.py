"""Tool calls: format detection, schema normalization, constraints per chat format (random walks
parse into calls whose arguments validate), and the incremental parser (streamed argument deltas
reassemble to the final call)."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest

from agentserve.grammar.interface import GrammarError
from agentserve.grammar.registry import get_backend
from helpers.grammar_walks import available_backends, decode, random_walk, tokenizer_info_for
from agentserve.grammar.spec import build_tool_constraint
from agentserve.grammar.tool_call_object import ContentDelta, ToolCallDelta
from agentserve.grammar.tool_constraint import parse_tools
from agentserve.grammar.tool_formats import HERMES_OPEN, MISTRAL_OPEN, PYTHON_TAG, detect_tool_format
from agentserve.grammar.tool_parser import ToolCallParser
from agentserve.grammar.tool_schema import normalize_tool_schema
from agentserve.testing.tiny import ARCHS, TOOL_CALL_FORMAT, tiny_model_cached


BACKENDS = available_backends()

# Real-world dialects: "dict"/"int"/"float", enums without type, OpenAPI-2 required flags, nesting.
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city",
        "parameters": {"type": "dict", "properties": {
            "city": {"type": "string", "maxLength": 12},
            "unit": {"enum": ["celsius", "fahrenheit"]},
            "days": {"type": "int", "enum": [1, 2, 3], "required": True}}}}},
    {"type": "function", "function": {
        "name": "search", "parameters": {"type": "object", "properties": {
            "query": {"type": "str"},
            "filters": {"type": "list", "items": {"type": "object", "properties": {
                "field": {"type": "string"}, "value": {"type": ["string", "number"]}},
                "required": ["field"], "additionalProperties": False}, "maxItems": 2},
            "exact": {"type": "bool"}},
            "required": ["query"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "now", "parameters": {}}},
]
SCHEMAS = {t.name: t.parameters for t in parse_tools(TOOLS)}
OPENER = {"hermes": HERMES_OPEN, "llama3_json": PYTHON_TAG, "mistral": MISTRAL_OPEN}
ARCH_CASES = ["llama", "llama3", "mistral", "qwen2"]  # every format; llama: no <|python_tag|> token


@pytest.fixture(scope="module")
def tokenizers():
    return {arch: tokenizer_info_for(tiny_model_cached(arch)) for arch in ARCH_CASES}


# --------------------------------------------------------------------------------------------
# Format detection
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_detect_tool_format_of_tiny_templates(arch: str) -> None:
    tok, _ = tokenizer_info_for(tiny_model_cached(arch))
    assert detect_tool_format(tok.chat_template) == TOOL_CALL_FORMAT[arch]


def test_detect_tool_format_markers_and_override() -> None:
    assert detect_tool_format("{{ '<tool_call>' }}") == "hermes"
    assert detect_tool_format("{{ '[TOOL_CALLS]' + x }}") == "mistral"
    assert detect_tool_format("<|start_header_id|>ipython<|end_header_id|>") == "llama3_json"
    assert detect_tool_format("{{ '<|python_tag|>' }}") == "llama3_json"
    assert detect_tool_format({"default": "x", "tool_use": "<tool_call>"}) == "hermes"
    assert detect_tool_format(None) == "hermes"
    assert detect_tool_format("<tool_call>", override="mistral") == "mistral"
    assert detect_tool_format("", override="qwen") == "hermes"
    with pytest.raises(ValueError):
        detect_tool_format("", override="klingon")


# --------------------------------------------------------------------------------------------
# Schema normalization
# --------------------------------------------------------------------------------------------


def test_normalize_dialects() -> None:
    got = normalize_tool_schema({
        "type": "dict",
        "properties": {
            "a": {"type": "float"}, "b": {"type": "int", "required": True}, "c": {"type": "bool"},
            "d": {"type": "list", "items": "str"}, "e": {"type": "string "}, "f": {"enum": ["x", "y"]},
            "g": {"enum": [1, 2.5]}, "h": {"properties": {"x": "long"}}, "i": {"type": "tuple", "items": {"type": "double"}},
            "j": {"type": "string", "nullable": True}, "k": {"required": False, "type": "integer"},
            "l": {"type": "any"}, "m": {"type": ["str", "null"]},
        },
        "required": ["a"],
    })
    p = got["properties"]
    assert got["type"] == "object" and got["required"] == ["a", "b"]
    assert p["a"] == {"type": "number"} and p["b"] == {"type": "integer"} and p["c"] == {"type": "boolean"}
    assert p["d"] == {"type": "array", "items": {"type": "string"}} and p["e"] == {"type": "string"}
    assert p["f"] == {"enum": ["x", "y"], "type": "string"} and p["g"]["type"] == "number"
    assert p["h"] == {"properties": {"x": {"type": "integer"}}, "type": "object"}
    assert p["i"] == {"type": "array", "items": {"type": "number"}}
    assert p["j"]["type"] == ["string", "null"] and p["k"] == {"type": "integer"}
    assert p["l"] == {} and p["m"]["type"] == ["string", "null"]
    jsonschema.Draft202012Validator.check_schema(got)
    assert normalize_tool_schema(None) == {"type": "object", "properties": {}}
    assert normalize_tool_schema({"properties": {"q": {"type": "string"}}})["type"] == "object"
    # draft-4 tuple items become prefixItems
    t = normalize_tool_schema({"type": "object", "properties": {"p": {"type": "array", "items": [{"type": "int"}],
                                                                       "additionalItems": False}}})
    assert t["properties"]["p"] == {"type": "array", "prefixItems": [{"type": "integer"}], "items": False}


@pytest.mark.parametrize("schema,message", [
    ({"type": "object", "properties": {"x": {"$dynamicRef": "#meta"}}},
     "unsupported keyword '$dynamicRef' at parameters.properties.x"),
    ({"type": "object", "properties": {"x": {"type": "array", "uniqueItems": True}}},
     "unsupported keyword 'uniqueItems' at parameters.properties.x"),
    ({"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}, "unsupported keyword 'if' at parameters"),
    ({"type": "object", "properties": {"x": {"propertyNames": {"maxLength": 3}}}},
     "unsupported keyword 'propertyNames' at parameters.properties.x"),
    ({"type": "object", "properties": {"x": {"$ref": "https://example.com/s.json"}}},
     "unsupported keyword '$ref' (only local '#/...' references) at parameters.properties.x"),
    ({"type": "object", "properties": {"x": {"type": "datetime"}}}, "unsupported type 'datetime' at parameters.properties.x.type"),
    ({"type": "string"}, "tool parameters must be an object schema, got type 'string' at parameters.type"),
    ([1, 2], "tool parameters must be a JSON object schema at parameters"),
    ({"type": "object", "properties": {"x": {"type": "integer", "enum": ["a"]}}}, "enum value 'a' does not match type"),
])
def test_normalize_rejects_with_keyword_and_path(schema, message: str) -> None:
    with pytest.raises(GrammarError) as e:
        normalize_tool_schema(schema)
    assert message in str(e.value)


def test_build_tool_constraint_choices() -> None:
    assert build_tool_constraint(TOOLS, "none", "hermes") is None
    assert build_tool_constraint([], "auto", "hermes") is None
    spec = build_tool_constraint(TOOLS, {"type": "function", "function": {"name": "search"}}, "mistral")
    payload = json.loads(spec.payload)
    assert payload["mode"] == "required" and payload["tools"] == ["search"]
    with pytest.raises(GrammarError, match="not among the tools"):
        build_tool_constraint(TOOLS, {"type": "function", "function": {"name": "nope"}}, "hermes")
    # a keyword no backend enforces: the calls are constrained without it (test_grammar_unenforced_keywords.py)
    assert build_tool_constraint([{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "uniqueItems": True}}}], "auto", "hermes") is not None
    with pytest.raises(GrammarError, match="duplicate tool name"):
        build_tool_constraint(TOOLS + TOOLS[:1], "auto", "hermes")
    assert build_tool_constraint(TOOLS, "auto", "hermes") == build_tool_constraint(TOOLS, "auto", "hermes")


# --------------------------------------------------------------------------------------------
# Constraints under random walks, parsed and validated
# --------------------------------------------------------------------------------------------


def _parse_streaming(fmt: str, text: str, rng: random.Random):
    parser = ToolCallParser(fmt, TOOLS)
    events = []
    i = 0
    while i < len(text):  # random chunking, as detokenized deltas arrive
        n = rng.randint(1, 6)
        events += parser.feed(text[i:i + n])
        i += n
    events += parser.flush()
    content, calls = parser.finish()
    return parser, events, content, calls


def _check_calls(fmt: str, text: str, calls, events, content, allowed_names) -> None:
    assert "".join(e.text for e in events if isinstance(e, ContentDelta)) == content
    by_index: dict[int, list[ToolCallDelta]] = {}
    for e in events:
        if isinstance(e, ToolCallDelta):
            by_index.setdefault(e.index, []).append(e)
    assert len(by_index) == len(calls), text
    for idx, call in enumerate(calls):
        assert call.name in allowed_names, (call.name, text)
        jsonschema.validate(json.loads(call.arguments_json), SCHEMAS[call.name])
        deltas = by_index[idx]
        assert deltas[0].id == call.id and deltas[0].name == call.name
        assert all(d.id is None and d.name is None for d in deltas[1:])
        assert "".join(d.arguments_delta for d in deltas) == call.arguments_json
    assert OPENER[fmt] not in content


def _walk(matcher, info, rng, prefix_text: str = "", max_tokens: int = 1500):
    """Accept the prefix (text, then possibly the opener as one token), then a random walk."""
    tokens: list[int] = []
    if prefix_text:
        for part in _split_marker(prefix_text, info):
            ids = [part] if isinstance(part, int) else info.hf_tokenizer.encode(part, add_special_tokens=False)
            assert matcher.accept_tokens(ids) == len(ids), f"prefix {prefix_text!r} refused"
            tokens += ids
    res = random_walk(matcher, rng, max_tokens=max_tokens, eos_prob=0.3)
    return tokens + res.tokens, res.finished


def _split_marker(text: str, info):
    for marker in (HERMES_OPEN, PYTHON_TAG, MISTRAL_OPEN):
        if marker in text and info.single_token_id(marker) is not None:
            before, after = text.split(marker, 1)
            return [p for p in (before,) if p] + [info.single_token_id(marker)] + ([after] if after else [])
    return [text]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCH_CASES)
@pytest.mark.parametrize("choice", ["auto", "required", "named"])
def test_tool_constraint_walks_parse_and_validate(backend: str, arch: str, choice: str, tokenizers) -> None:
    tok, info = tokenizers[arch]
    fmt = TOOL_CALL_FORMAT[arch]
    tool_choice = {"type": "function", "function": {"name": "search"}} if choice == "named" else choice
    allowed = {"search"} if choice == "named" else set(SCHEMAS)
    compiled = get_backend(backend).compile(build_tool_constraint(TOOLS, tool_choice, fmt), info)
    finished = 0
    calls_seen = 0
    for seed in range(6):
        rng = random.Random(seed)
        if choice == "auto":
            # free text first, then the opener, then whatever the grammar allows
            prefix = ("Let me look that up. " + OPENER[fmt]) if seed % 3 else ""
        else:
            prefix = ""
        tokens, done = _walk(compiled.new_matcher(), info, rng, prefix)
        if not done:
            continue
        finished += 1
        text = decode(info, tokens)
        parser, events, content, calls = _parse_streaming(fmt, text, rng)
        assert not parser.truncated, text
        if choice != "auto" or prefix:
            assert calls, f"no call parsed from {text!r}"
        _check_calls(fmt, text, calls, events, content, allowed)
        calls_seen += len(calls)
    assert finished >= 3 and calls_seen >= 2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", ["hermes", "llama3_json", "mistral"])
def test_single_call_when_not_parallel(backend: str, fmt: str, tokenizers) -> None:
    arch = {"hermes": "qwen2", "llama3_json": "llama3", "mistral": "mistral"}[fmt]
    tok, info = tokenizers[arch]
    compiled = get_backend(backend).compile(build_tool_constraint(TOOLS, "required", fmt, parallel=False), info)
    for seed in range(6):
        tokens, done = _walk(compiled.new_matcher(), info, random.Random(seed))
        if done:
            _, events, content, calls = _parse_streaming(fmt, decode(info, tokens), random.Random(seed))
            assert len(calls) == 1
            _check_calls(fmt, decode(info, tokens), calls, events, content, set(SCHEMAS))


def test_backends_reject_what_they_do_not_enforce(tokenizers) -> None:
    _, info = tokenizers["qwen2"]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 7}}}}}]
    spec = build_tool_constraint(tools, "required", "hermes")
    if "outlines" in BACKENDS:
        with pytest.raises(GrammarError, match="outlines does not enforce 'minimum' .at properties.arguments.properties.n"):
            get_backend("outlines").compile(spec, info)
    get_backend("llguidance").compile(spec, info)  # the default enforces bounds


@pytest.mark.parametrize("backend", BACKENDS)
def test_auto_text_cannot_contain_the_opener(backend: str, tokenizers) -> None:
    tok, info = tokenizers["qwen2"]
    m = get_backend(backend).compile(build_tool_constraint(TOOLS, "auto", "hermes"), info).new_matcher()
    ids = tok.encode("plain text <tool_cal", add_special_tokens=False)
    assert m.accept_tokens(ids) == len(ids) and m.is_accepting()  # text: EOS allowed
    # spelling the rest of the opener out is a call start too: no free text "<tool_call>"
    rest = tok.encode("l>", add_special_tokens=False)
    if m.accept_tokens(rest) == len(rest):
        assert not m.is_accepting()  # inside a call now, not text


# --------------------------------------------------------------------------------------------
# The parser on hand-written outputs
# --------------------------------------------------------------------------------------------


def _parse_all(fmt: str, text: str, chunk: int):
    parser = ToolCallParser(fmt)
    events = []
    for i in range(0, len(text), chunk):
        events += parser.feed(text[i:i + chunk])
    events += parser.flush()
    content, calls = parser.finish()
    return parser, events, content, [(c.name, c.arguments_json) for c in calls]


@pytest.mark.parametrize("chunk", [1, 2, 5, 1000])
def test_parser_hermes(chunk: int) -> None:
    text = ('Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "x": [1, {"a": "}\\""}]}}\n'
            '</tool_call>\n<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>\n')
    p, events, content, calls = _parse_all("hermes", text, chunk)
    assert content == "Checking.\n" and not p.truncated
    assert calls == [("get_weather", '{"city": "Paris", "x": [1, {"a": "}\\""}]}'), ("now", "{}")]
    assert "".join(e.text for e in events if isinstance(e, ContentDelta)) == content


@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_parser_llama3_json(chunk: int) -> None:
    _, _, content, calls = _parse_all("llama3_json", ' {"name": "f", "parameters": {"a": 1}}; {"name": "g", "parameters": {"b": "x;y"}}', chunk)
    assert content == "" and calls == [("f", '{"a": 1}'), ("g", '{"b": "x;y"}')]
    _, _, content, calls = _parse_all("llama3_json", 'Sure <|python_tag|>{"name": "f", "parameters": {}}', chunk)
    assert content == "Sure " and calls == [("f", "{}")]
    _, _, content, calls = _parse_all("llama3_json", "Hello, {not a call} <|pyth", chunk)
    assert content == "Hello, {not a call} <|pyth" and calls == []


@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_parser_mistral(chunk: int) -> None:
    text = 'ok [TOOL_CALLS] [{"name": "f", "arguments": {"a": 1.5}, "id": "abc123xyz"}, {"name": "g", "arguments": {"q": "[TOOL_CALLS]"}}]'
    p, _, content, calls = _parse_all("mistral", text, chunk)
    assert content == "ok " and calls == [("f", '{"a": 1.5}'), ("g", '{"q": "[TOOL_CALLS]"}')] and not p.truncated


def test_parser_streams_arguments_before_the_call_ends() -> None:
    parser = ToolCallParser("hermes")
    first = parser.feed('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa')
    call_deltas = [e for e in first if isinstance(e, ToolCallDelta)]
    assert call_deltas and call_deltas[0].name == "get_weather" and call_deltas[0].id.startswith("call_")
    assert "".join(d.arguments_delta for d in call_deltas) == '{"city": "Pa'
    more = parser.feed('ris"}}\n</tool_call>')
    assert "".join(d.arguments_delta for d in more if isinstance(d, ToolCallDelta)) == 'ris"}'
    content, calls = parser.finish()
    assert calls[0].arguments_json == '{"city": "Paris"}' and calls[0].id == call_deltas[0].id


def test_parser_truncated_call_is_not_returned() -> None:
    parser, events, content, calls = _parse_all("hermes", '<tool_call>\n{"name": "f", "arguments": {"a": ', 3)
    assert parser.truncated and calls == []
    parser, _, content, calls = _parse_all("mistral", '[TOOL_CALLS][{"name": "f", "arguments": {}}', 3)
    assert parser.truncated and calls == [("f", "{}")]  # the call is complete, the list is not
    # The next call's opener cut off after a complete call (max_tokens): neither content nor a call; text
    # after a call that is no opener stays content.
    done = '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'
    for tail, want_content in (("\n<tool", ""), ("\n<tool_c", ""), ("\nok", "\nok")):
        parser, events, content, calls = _parse_all("hermes", done + tail, 3)
        assert calls == [("f", "{}")] and content == want_content
        assert "".join(e.text for e in events if isinstance(e, ContentDelta)) == want_content


def test_parser_string_arguments_and_ids() -> None:
    _, events, _, calls = _parse_all("hermes", '<tool_call>\n{"name": "f", "arguments": "{\\"a\\": 1}"}\n</tool_call>', 2)
    assert calls == [("f", '{"a": 1}')]
    assert "".join(e.arguments_delta for e in events if isinstance(e, ToolCallDelta)) == '{"a": 1}'
    p = ToolCallParser("mistral")
    p.feed('[TOOL_CALLS][{"name": "f", "arguments": {}}]')
    _, calls = p.finish()
    assert len(calls[0].id) == 9 and calls[0].id.isalnum()
    assert calls[0].to_openai() == {"id": calls[0].id, "type": "function", "function": {"name": "f", "arguments": "{}"}}


@pytest.mark.parametrize("chunk", [1, 3, 1000])
@pytest.mark.parametrize("fmt,text", [
    ("hermes", 'Hm <tool_call>\n{"name": "get_weather", "arguments": {"city": }}\n</tool_call>'),
    ("hermes", '<tool_call>\n{"name": get_weather, "arguments": {}}\n</tool_call>'),
    ("llama3_json", '{"name": "get_weather", "parameters": {city: Paris}}'),
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": Paris}}]'),
    ("mistral_v11", '[TOOL_CALLS]get_weather[ARGS]{"city": Paris}'),
])
def test_a_call_that_is_not_json_is_content_as_written(fmt: str, text: str, chunk: int) -> None:
    """vLLM's parsers return the model's text as content when json.loads fails on a call; the scanner used
    to check only brackets and strings, so `{"city": }` came back as a call with arguments no client parses."""
    parser, _, content, calls = _parse_all(fmt, text, chunk)
    assert calls == [] and content == text
