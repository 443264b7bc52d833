"""Mistral's tool-call format from tokenizer v11 on (Magistral, Devstral, Mistral Small 3.2, Ministral 3):
`[TOOL_CALLS]name[ARGS]{arguments}` per call, no list and no ids. Before it was supported, a model whose chat
template writes calls so was read as the older `[TOOL_CALLS][{...}]` format: its calls came back as text, and a
constrained call (tool_choice required / named) forced a format the model was never trained on. Detection from
the template, the incremental parser (any split of the text), the constraint under random walks on every
grammar backend (each parsed call validates), and a tool whose parameters cannot compile named by the error.
The HTTP round trip runs in test_openai_tools.py (the `mistral_v11` client)."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest

from agentserve.grammar.compiler import GrammarCompiler
from agentserve.grammar.interface import GrammarError
from agentserve.grammar.registry import get_backend
from agentserve.grammar.spec import build_tool_constraint
from agentserve.grammar.tool_formats import detect_tool_format
from agentserve.grammar.tool_parser import ToolCallParser
from agentserve.testing.tiny import tiny_model_cached
from agentserve.vllm_flags import check_tool_call_parser
from helpers.grammar_walks import available_backends, decode, random_walk, tokenizer_info_for
from mistral_v11_template import MISTRAL_V11_TEMPLATE

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city"], "additionalProperties": False}
NODE = {"type": "object", "properties": {"label": {"type": "string", "maxLength": 6},
                                         "child": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}},
        "required": ["label"], "additionalProperties": False}  # a local reference to its own root
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "tree.add", "parameters": NODE}},
         {"type": "function", "function": {"name": "now", "parameters": {}}}]
SCHEMAS = {"get_weather": WEATHER, "tree.add": NODE, "now": {}}


def test_detected_from_the_template_and_accepted_as_vllms_mistral_parser() -> None:
    assert detect_tool_format(MISTRAL_V11_TEMPLATE) == "mistral_v11"
    assert detect_tool_format("{{ '[TOOL_CALLS] [' + calls + ']' }}") == "mistral"
    check_tool_call_parser("mistral", MISTRAL_V11_TEMPLATE)  # vLLM's one name for both Mistral formats
    with pytest.raises(SystemExit, match="mistral_v11"):
        check_tool_call_parser("hermes", MISTRAL_V11_TEMPLATE)


def _parse(text: str, rng: random.Random) -> tuple[ToolCallParser, str, list[tuple[str, str]], list]:
    parser = ToolCallParser("mistral_v11", TOOLS)
    events, i = [], 0
    while i < len(text):
        n = rng.randint(1, 7)
        events += parser.feed(text[i:i + n])
        i += n
    events += parser.flush()
    content, calls = parser.finish()
    return parser, content, [(c.name, c.arguments_json) for c in calls], events


@pytest.mark.parametrize("seed", range(5))
def test_the_parser_on_any_split(seed: int) -> None:
    text = ('Let me check. [TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "celsius"}'
            '[TOOL_CALLS]tree.add[ARGS] {"label": "a", "child": null}')
    parser, content, calls, events = _parse(text, random.Random(seed))
    assert content == "Let me check. " and not parser.truncated
    assert calls == [("get_weather", '{"city": "Paris", "unit": "celsius"}'), ("tree.add", '{"label": "a", "child": null}')]
    ids = [e.id for e in events if getattr(e, "id", None)]
    assert len(ids) == 2 and all(len(i) == 9 and i.isalnum() for i in ids)  # Mistral's 9-character ids
    streamed = "".join(e.arguments_delta for e in events if getattr(e, "index", None) == 1)
    assert streamed == calls[1][1]


@pytest.mark.parametrize("text", ["[TOOL_CALLS]two words[ARGS]{}", "[TOOL_CALLS]f(x)", "[TOOL_CALLS]f[ARGS]x",
                                  "[TOOL_CALLS]f[ARGS]{\"a\": ]}"])
def test_malformed_calls_stay_text(text: str) -> None:
    _, content, calls, _ = _parse(text, random.Random(0))
    assert calls == [] and content.startswith("[TOOL_CALLS]")


def test_a_call_cut_off_is_partial() -> None:
    parser = ToolCallParser("mistral_v11", TOOLS)
    parser.feed('[TOOL_CALLS]get_weather[ARGS]{"city": "Ro')
    assert parser.finish() == ("", []) and parser.truncated
    assert parser.partial_call is not None and parser.partial_call.name == "get_weather"


@pytest.fixture(scope="module")
def info():
    return tokenizer_info_for(tiny_model_cached("mistral"))[1]


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("choice", ["auto", "required", "named", "single"])
def test_constrained_calls_parse_and_validate(backend: str, choice: str, info) -> None:
    tool_choice = {"type": "function", "function": {"name": "tree.add"}} if choice == "named" else \
        ("required" if choice == "single" else choice)
    spec = build_tool_constraint(TOOLS, tool_choice, "mistral_v11", parallel=choice != "single")
    compiled = get_backend(backend).compile(spec, info)
    finished = calls_seen = 0
    for seed in range(8):
        rng = random.Random(seed)
        matcher = compiled.new_matcher()
        prefix: list[int] = []
        if choice == "auto" and seed % 2:  # text, then the opener (one special token in this tokenizer)
            prefix = info.hf_tokenizer.encode("Checking. [TOOL_CALLS]", add_special_tokens=False)
            assert matcher.accept_tokens(prefix) == len(prefix)
        walk = random_walk(matcher, rng, max_tokens=1200, eos_prob=0.3)
        if not walk.finished:
            continue
        finished += 1
        text = decode(info, prefix + walk.tokens)
        parser, content, calls, _ = _parse(text, rng)
        assert not parser.truncated and "[TOOL_CALLS]" not in content, text
        if choice != "auto" or prefix:
            assert calls, text
        if choice in ("named", "single"):
            assert len(calls) == 1
        for name, args in calls:
            assert name in (("tree.add",) if choice == "named" else SCHEMAS), text
            jsonschema.validate(json.loads(args), SCHEMAS[name])
        calls_seen += len(calls)
    assert finished >= 4 and calls_seen >= 3


def test_a_tool_whose_parameters_cannot_compile_is_named(info) -> None:
    bad = {"type": "function", "function": {"name": "ban", "parameters": {
        "type": "object", "properties": {"user": {"type": "string", "pattern": "^(?!root$)"}}}}}  # no lookahead
    compiler = GrammarCompiler(get_backend("llguidance"), info, max_workers=1)
    try:
        future = compiler.submit(build_tool_constraint(TOOLS + [bad], "auto", "mistral_v11"))
        with pytest.raises(GrammarError, match='tool "ban"'):
            future.result(timeout=60)
    finally:
        compiler.shutdown()


def test_declared_names_of_any_spelling_are_read() -> None:
    """A declared tool name outside the usual characters (the grammar writes it as declared) is still read as
    the call's name; undeclared, such text stays text."""
    odd = [{"type": "function", "function": {"name": "web search/v2", "parameters": {}}}]
    text = '[TOOL_CALLS]web search/v2[ARGS]{"q": 1}'
    parser = ToolCallParser("mistral_v11", odd)
    for ch in text:
        parser.feed(ch)
    assert [(c.name, c.arguments_json) for c in parser.finish()[1]] == [("web search/v2", '{"q": 1}')]
    _, content, calls, _ = _parse(text, random.Random(1))  # TOOLS does not declare it
    assert calls == [] and content == text
