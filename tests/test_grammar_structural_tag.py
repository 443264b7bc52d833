"""Structural tags (vLLM's `structural_tag`: free text with constrained parts) on every grammar backend.

Outputs are checked by a reader written here from the format's definition (vLLM's and xgrammar's
documentation), not by the grammar code: each trigger in the text starts one of its tags, whose JSON
validates (jsonschema) and whose end follows; outside the tags, free text.
"""

from __future__ import annotations

import json
import random
import re
from typing import Any, Optional

import jsonschema
import pytest

from agentserve.grammar.compiler import GrammarCompiler
from agentserve.grammar.interface import GrammarError
from agentserve.grammar.registry import get_backend
from agentserve.grammar.spec import ConstraintSpec
from agentserve.grammar.structural_tag import structural_tag_tree
from helpers.grammar_walks import available_backends, decode, random_walk, tokenizer_info_for
from agentserve.testing.tiny import tiny_model_cached

BACKENDS = available_backends()
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                            "days": {"enum": [1, 3, 7]}},
           "required": ["city"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}}, "required": ["tz"],
        "additionalProperties": False}
LEGACY = {"type": "structural_tag", "triggers": ["<function="],
          "structures": [{"begin": "<function=get_weather>", "schema": WEATHER, "end": "</function>"},
                         {"begin": "<function=get_time>", "schema": TIME, "end": "</function>"}]}
# Qwen's own call markers: added (not special) tokens of the tiny qwen2 tokenizer
QWEN_CALLS = {"type": "structural_tag", "triggers": ["<tool_call>"],
              "structures": [{"begin": "<tool_call>\n", "schema": {"type": "object", "properties": {
                  "name": {"const": "get_time"}, "arguments": TIME}, "required": ["name", "arguments"],
                  "additionalProperties": False}, "end": "\n</tool_call>"}]}
_WS = " \t\n\r"


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def check_triggered(text: str, triggers: list[str], tags: list[tuple[str, dict, str]]) -> int:
    """Asserts `text` is free text in which each trigger starts a whole tag (begin, JSON valid against its
    schema, end); returns the number of tags."""
    pos, found = 0, 0
    while True:
        hits = [(i, t) for t in triggers if (i := text.find(t, pos)) >= 0]
        if not hits:
            return found
        at = min(hits)[0]
        tag = next((t for t in tags if text.startswith(t[0], at)), None)
        assert tag is not None, f"a trigger at {at} starts no tag: {text[at:at + 40]!r}"
        begin, schema, end = tag
        value, j = json.JSONDecoder().raw_decode(text, _skip_ws(text, at + len(begin)))
        jsonschema.validate(value, schema)
        j = _skip_ws(text, j) if not end[0] in _WS else j
        assert text.startswith(end, j), f"no end {end!r} after the JSON at {j}: {text[j:j + 20]!r}"
        pos, found = j + len(end), found + 1


def _legacy_tags(tag: dict) -> list[tuple[str, dict, str]]:
    return [(s["begin"], s["schema"], s["end"]) for s in tag["structures"]]


_COMPILED: dict[tuple[str, ConstraintSpec, str], tuple[Any, Any, Any]] = {}


def _matcher(backend: str, spec: ConstraintSpec, arch: str = "qwen2") -> tuple[Any, Any, Any]:
    """A fresh matcher of the spec, compiled as the engine compiles it (with the compiler's probes)."""
    key = (backend, spec, arch)
    if key not in _COMPILED:
        tok, info = tokenizer_info_for(tiny_model_cached(arch))
        _COMPILED[key] = GrammarCompiler(get_backend(backend), info, timeout_s=60.0).compile(spec), tok, info
    compiled, tok, info = _COMPILED[key]
    return compiled.new_matcher(), tok, info


def _feed(matcher: Any, tok: Any, text: str) -> bool:
    """Whether the matcher takes `text` (as the tokenizer spells it) token by token."""
    return all(matcher.accept_token(t) for t in tok.encode(text, add_special_tokens=False))


def _walk_text(matcher: Any, info: Any, rng: random.Random, prefix_ids: list[int]) -> Optional[str]:
    walk = random_walk(matcher, rng, max_tokens=300, eos_prob=0.3)
    return decode(info, prefix_ids + walk.tokens) if walk.finished else None


# -- the request shapes -------------------------------------------------------------------------------


def test_the_two_request_shapes_describe_the_same_output() -> None:
    as_format = {"type": "structural_tag", "format": {"type": "triggered_tags", "triggers": ["<function="], "tags": [
        {"type": "tag", "begin": s["begin"], "content": {"type": "json_schema", "json_schema": s["schema"]},
         "end": s["end"]} for s in LEGACY["structures"]]}}
    assert structural_tag_tree(LEGACY) == structural_tag_tree(as_format) == structural_tag_tree(json.dumps(LEGACY))
    # vLLM's structured_outputs.structural_tag form has no "type"
    assert structural_tag_tree({k: v for k, v in LEGACY.items() if k != "type"}) == structural_tag_tree(LEGACY)


def _triggered(**kw: Any) -> dict:
    fmt = {"type": "triggered_tags", "triggers": ["<f="], "tags": [
        {"type": "tag", "begin": "<f=a>", "content": {"type": "json_schema", "json_schema": {}}, "end": "</f>"}]}
    return {"type": "structural_tag", "format": {**fmt, **kw}}


@pytest.mark.parametrize("tag, message", [
    ("{not json", "structural_tag is not valid JSON"),
    ([], "structural_tag must be an object"),
    ({"type": "json_schema"}, "structural_tag.type must be 'structural_tag'"),
    ({"type": "structural_tag"}, "needs 'format'"),
    ({"structures": [], "triggers": ["<f"]}, "structural_tag.structures must be a non-empty list"),
    ({"structures": [{"begin": "<g>", "schema": {}, "end": "</g>"}], "triggers": ["<f"]},
     "structural_tag.tags[0].begin '<g>' must start with exactly one of the triggers"),
    ({"structures": [{"begin": "<f>", "schema": {}, "end": "</f>"}], "triggers": []},
     "structural_tag.triggers must be a non-empty list"),
    ({"structures": [{"begin": "<f>", "schema": {}, "end": "</f>", "extra": 1}], "triggers": ["<f"]},
     "structural_tag.structures[0]: unknown field 'extra'"),
    ({"structures": [{"begin": "<f>", "schema": {"type": "array", "uniqueItems": True}, "end": "</f>"}],
      "triggers": ["<f"]}, "unsupported keyword 'uniqueItems'"),
    ({"structures": [{"begin": "<f>", "schema": [1], "end": "</f>"}], "triggers": ["<f"]},
     "structural_tag.tags[0].content.json_schema must be a JSON schema object"),
    ({"format": {"type": "grammar", "grammar": "root ::= \"a\""}}, "structural_tag.format.type 'grammar': EBNF"),
    ({"format": {"type": "token", "token": "<x>"}}, "token-level formats are not supported"),
    ({"format": {"type": "nope"}}, "structural_tag.format.type must be one of const_string"),
    ({"format": {"type": "json_schema", "json_schema": {}, "style": "qwen_xml"}}, "style 'qwen_xml' is not supported"),
    ({"format": {"type": "json_schema", "json_schema": {}, "any_order": True}}, "any_order is not supported"),
    ({"format": {"type": "any_text", "max_tokens": 5}}, "structural_tag.format.max_tokens is not supported"),
    ({"format": {"type": "repeat", "min": 2, "max": 1, "content": {"type": "const_string", "value": "a"}}},
     "structural_tag.format.max must be an integer >= min"),
    ({"format": {"type": "repeat", "min": 0, "max": 1000, "content": {"type": "const_string", "value": "a"}}},
     "min and max may be at most 32"),
    ({"format": {"type": "sequence", "elements": []}}, "structural_tag.format.elements must be a non-empty list"),
    ({"format": {"type": "tag", "begin": "<a>", "content": {"type": "any_text"}, "end": {"type": "token"}}},
     "structural_tag.format.end must be a string or a non-empty list of strings"),
    (_triggered(at_least_one="yes"), "structural_tag.format.at_least_one must be true or false"),
    (_triggered(triggers=["<f", "<f="]), "must start with exactly one of the triggers"),
    ({"format": {"type": "sequence", "elements": [{"type": "const_string", "value": "a"}] * 3000}},
     "more than 2000 format objects"),
    # free text with no place where it must end
    ({"format": {"type": "sequence", "elements": [{"type": "any_text"}, {"type": "json_schema", "json_schema": {}}]}},
     "structural_tag.format.elements[0]: any_text must end its tag or the output, or be followed by a const_string"),
    ({"format": {"type": "tag", "begin": "<t>", "end": "</t>", "content": {"type": "star", "content": {
        "type": "any_text"}}}}, "structural_tag.format.content.content: any_text must end its tag"),
    ({"format": {"type": "sequence", "elements": [_triggered()["format"], {"type": "regex", "pattern": "a"}]}},
     "structural_tag.format.elements[0]: triggered_tags must end its tag or the output"),
])
def test_bad_structural_tags_are_refused_naming_the_place(tag: Any, message: str) -> None:
    with pytest.raises(GrammarError, match=re.escape(message)):
        ConstraintSpec.structural_tag(tag)


# -- on every backend ---------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tag, arch", [(LEGACY, "llama3"), (QWEN_CALLS, "qwen2")], ids=["function", "qwen"])
def test_each_trigger_starts_a_whole_valid_tag(backend: str, tag: dict, arch: str) -> None:
    spec = ConstraintSpec.structural_tag(tag)
    rng = random.Random(7)
    tags, triggers = _legacy_tags(tag), tag["triggers"]
    checked = with_tags = 0
    for i in range(24):
        matcher, tok, info = _matcher(backend, spec, arch)
        # half the walks are steered into a tag (a random model would never write a trigger), then go on freely
        begin = tags[i % len(tags)][0]
        prefix = tok.encode(f"Let me check. {begin}" if i % 2 else "", add_special_tokens=False)
        assert all(matcher.accept_token(t) for t in prefix)
        text = _walk_text(matcher, info, rng, prefix)
        if text is None:
            continue
        checked += 1
        with_tags += check_triggered(text, triggers, tags) > 0
    assert checked >= 12 and with_tags >= 6, (checked, with_tags)


@pytest.mark.parametrize("backend", BACKENDS)
def test_text_that_breaks_the_tag_is_refused(backend: str) -> None:
    spec = ConstraintSpec.structural_tag(LEGACY)
    good = ['Sure: <function=get_time>{"tz": "UTC"}</function> done.',
            'no call at all', '<function=get_weather>{"city": "Oslo", "days": 3}</function>']
    bad = ['<function=get_date>{}</function>',                  # no such tag after the trigger
           '<function=get_time>{"tz": "PST"}</function>',      # outside the schema
           '<function=get_time>{"tz": "UTC"}</func>',            # a wrong end
           '<function=get_weather>{"city": "Oslo", "x": 1}</function>']
    for text in good:
        matcher, tok, _ = _matcher(backend, spec, "llama3")
        assert _feed(matcher, tok, text) and matcher.is_accepting(), text
    for text in bad:
        matcher, tok, _ = _matcher(backend, spec, "llama3")
        assert not (_feed(matcher, tok, text) and matcher.is_accepting()), text


@pytest.mark.parametrize("backend", BACKENDS)
def test_format_objects_compose(backend: str) -> None:
    """A reasoning tag with free text up to its end, then one or more calls separated by commas, then
    nothing else; every walk read back by the format's definition."""
    call = {"type": "tag", "begin": "<call>", "content": {"type": "json_schema", "json_schema": TIME},
            "end": "</call>"}
    tag = {"type": "structural_tag", "format": {"type": "sequence", "elements": [
        {"type": "tag", "begin": "<think>", "content": {"type": "any_text"}, "end": "</think>"},
        {"type": "optional", "content": {"type": "const_string", "value": "\n"}},
        {"type": "tags_with_separator", "tags": [call], "separator": ",", "at_least_one": True},
        {"type": "repeat", "min": 1, "max": 2, "content": {"type": "regex", "pattern": "[0-9]"}}]}}
    spec = ConstraintSpec.structural_tag(tag)
    shape = re.compile(r"<think>((?:(?!</think>).)*)</think>\n?((?:<call>.*?</call>,)*<call>.*?</call>)([0-9]{1,2})",
                       re.S)
    rng = random.Random(3)
    checked = 0
    for i in range(16):
        matcher, tok, info = _matcher(backend, spec, "llama3")
        # past the free text (a random walk would not write its end), the rest random
        prefix = tok.encode(f"<think>step {i} <b>ok</b></think>", add_special_tokens=False)
        assert all(matcher.accept_token(t) for t in prefix)
        text = _walk_text(matcher, info, rng, prefix)
        if text is None:
            continue
        checked += 1
        m = shape.fullmatch(text)
        assert m is not None, text
        for body in re.findall(r"<call>(.*?)</call>", m.group(2), re.S):
            jsonschema.validate(json.loads(body), TIME)
    assert checked >= 8
    matcher, tok, _ = _matcher(backend, spec, "llama3")
    assert _feed(matcher, tok, '<think>hm <b></think><call>{"tz": "CET"}</call>,<call>{"tz":"UTC"}</call>42')
    assert matcher.is_accepting()
    matcher, tok, _ = _matcher(backend, spec, "llama3")
    assert not (_feed(matcher, tok, '<think>x</think><call>{"tz": "CET"}</call>123') and matcher.is_accepting())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("at_least_one, stop_after_first", [(True, False), (False, True), (True, True)])
def test_triggered_tags_flags(backend: str, at_least_one: bool, stop_after_first: bool) -> None:
    tag = {"type": "structural_tag", "format": {
        "type": "triggered_tags", "triggers": ["<f="], "at_least_one": at_least_one,
        "stop_after_first": stop_after_first, "tags": [
            {"type": "tag", "begin": "<f=t>", "content": {"type": "json_schema", "json_schema": TIME}, "end": "</f>"}]}}
    spec = ConstraintSpec.structural_tag(tag)
    one = '<f=t>{"tz": "UTC"}</f>'
    cases = {f"hello {one}": not at_least_one, one: True, f"{one} bye": not stop_after_first,
             f"{one} and {one}": not stop_after_first, "just text": not at_least_one}
    for text, allowed in cases.items():
        matcher, tok, _ = _matcher(backend, spec, "llama3")
        assert (_feed(matcher, tok, text) and matcher.is_accepting()) == allowed, (text, allowed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_free_text_inside_a_tag_never_holds_the_tag_end(backend: str) -> None:
    """Free text before a constant stops at the constant's first occurrence, and never holds the end of
    its tag: text containing either would leave where it ends to a guess."""
    tag = {"type": "structural_tag", "format": {"type": "tag", "begin": "<t>", "end": "\n", "content": {
        "type": "sequence", "elements": [{"type": "any_text"}, {"type": "const_string", "value": "."}]}}}
    spec = ConstraintSpec.structural_tag(tag)
    for text, allowed in (("<t>one two.\n", True), ("<t>.\n", True), ("<t>one\ntwo.\n", False),
                          ("<t>a.b.\n", False)):
        matcher, tok, _ = _matcher(backend, spec, "llama3")
        assert (_feed(matcher, tok, text) and matcher.is_accepting()) == allowed, (text, allowed)
