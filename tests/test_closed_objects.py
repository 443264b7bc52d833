"""Objects closed to undeclared keys (grammar/closed_objects.py, vLLM's default through xgrammar's strict
mode): tool arguments and json_schema outputs never carry a key the schema's properties do not declare
unless the schema allows other keys, on every backend; where other keywords bring keys (allOf, anyOf /
oneOf beside properties, $ref'd definitions merged by allOf, required keys outside the properties) the
object stays open, so no valid document is lost."""

from __future__ import annotations

import json
from typing import Any

import pytest

from agentserve.grammar.closed_objects import close_objects
from agentserve.grammar.registry import get_backend
from agentserve.grammar.spec import ConstraintSpec, build_tool_constraint
from agentserve.grammar.tool_parser import ToolCallParser
from agentserve.testing.tiny import TOOL_CALL_FORMAT, tiny_model_cached
from helpers.grammar_walks import available_backends, tokenizer_info_for

BACKENDS = available_backends()
OPEN = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                         "when": {"type": "object", "properties": {"day": {"type": "integer"}}}},
        "required": ["city"]}


def test_objects_with_properties_are_closed_and_the_rest_kept() -> None:
    closed = close_objects(OPEN)
    assert closed["additionalProperties"] is False and closed["properties"]["when"]["additionalProperties"] is False
    assert OPEN.get("additionalProperties") is None  # a copy: the caller's schema is untouched
    for kept in ({"type": "object"},  # no properties: any object
                 {"type": "object", "properties": {"a": {}}, "additionalProperties": True},
                 {"type": "object", "properties": {"a": {}}, "additionalProperties": {"type": "integer"}},
                 {"type": "object", "properties": {"a": {}}, "patternProperties": {"^x": {}}},
                 {"type": "object", "properties": {"a": {}}, "required": ["a", "b"]},  # b comes from elsewhere
                 {"type": "object", "properties": {"a": {}}, "minProperties": 2},
                 {"properties": {"kind": {}}, "oneOf": [{"properties": {"a": {}}}, {"properties": {"b": {}}}]},
                 {"allOf": [{"$ref": "#/$defs/Base"}, {"properties": {"y": {}}}],
                  "$defs": {"Base": {"properties": {"x": {}}}}},
                 {"not": {"properties": {"a": {}}}},
                 {"properties": {"a": {"enum": [{"properties": {"q": 1}}]}, "b": {"const": {"properties": 1}}},
                  "additionalProperties": True}):
        assert close_objects(kept) == kept, kept
    # Branches of anyOf / oneOf without properties beside them are whole alternatives: closed.
    alt = close_objects({"anyOf": [{"type": "object", "properties": {"a": {}}}, {"type": "null"}]})
    assert alt["anyOf"][0]["additionalProperties"] is False
    # A definition referenced outside allOf is closed; one merged by allOf stays open.
    defs = close_objects({"properties": {"p": {"$ref": "#/$defs/P"}},
                          "allOf": [{"$ref": "#/$defs/M"}], "$defs": {"P": {"properties": {"x": {}}},
                                                                       "M": {"properties": {"y": {}}}}})
    assert defs["$defs"]["P"]["additionalProperties"] is False and "additionalProperties" not in defs["$defs"]["M"]


def _accepts(matcher: Any, ids: list[int]) -> bool:
    return all(matcher.accept_token(t) for t in ids)


@pytest.mark.parametrize("backend", BACKENDS)
def test_undeclared_keys_are_refused_in_outputs_and_tool_arguments(backend: str) -> None:
    """The same text with and without an undeclared key, token by token through the masks' matcher: the
    declared one is accepted, the other refused (llguidance on its own would take it: JSON Schema's open
    objects; xgrammar's strict mode and outlines would not)."""
    tok, info = tokenizer_info_for(tiny_model_cached("qwen2"))
    good, extra = '{"city": "Oslo", "when": {"day": 2}}', '{"city": "Oslo", "when": {"day": 2, "hour": 9}}'
    for text, ok in ((good, True), (extra, False), ('{"city": "Oslo", "zz": 1}', False)):
        matcher = get_backend(backend).compile(ConstraintSpec.json_schema(OPEN), info).new_matcher()
        assert _accepts(matcher, tok.encode(text, add_special_tokens=False)) == ok, text
    fmt = TOOL_CALL_FORMAT["qwen2"]
    assert fmt == "hermes"
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": OPEN}}]
    spec = build_tool_constraint(tools, "required", fmt, parallel=False)
    for args, ok in ((good, True), ('{"city": "Oslo", "description": "rainy"}', False)):
        text = f'<tool_call>\n{{"name": "get_weather", "arguments": {args}}}\n</tool_call>'
        matcher = get_backend(backend).compile(spec, info).new_matcher()
        assert _accepts(matcher, tok.encode(text, add_special_tokens=False)) == ok, text
        if ok:
            parser = ToolCallParser(fmt, tools)
            parser.feed(text)
            parser.flush()
            _, calls = parser.finish()
            assert [json.loads(c.arguments_json) for c in calls] == [json.loads(args)]


def test_an_explicitly_open_object_still_takes_other_keys() -> None:
    tok, info = tokenizer_info_for(tiny_model_cached("qwen2"))
    ids = tok.encode('{"a": 1, "zz": 2}', add_special_tokens=False)
    declared = {"type": "object", "properties": {"a": {"type": "integer"}}}
    for schema, takes_zz in (({**declared, "additionalProperties": True}, True), (declared, False)):
        matcher = get_backend("auto").compile(ConstraintSpec.json_schema(schema), info).new_matcher()
        assert all(matcher.accept_token(t) for t in ids) == takes_zz


def test_schemas_a_key_brings_in_stay_open() -> None:
    """dependentSchemas / dependencies apply to the object itself when their key is present: closing them
    refused the object's own keys, so the key could never be written (here it is required: the schema could
    not be satisfied at all). Their nested objects are separate values: closed as usual."""
    schema = {"type": "object", "required": ["coupon"], "properties": {
        "coupon": {"type": "string", "maxLength": 6}, "discount": {"type": "integer", "minimum": 1, "maximum": 9}},
        "dependentSchemas": {"coupon": {"required": ["discount"], "properties": {
            "discount": {"type": "integer"}, "meta": {"type": "object", "properties": {"by": {"type": "string"}}}}}}}
    closed = close_objects(schema)
    dependent = closed["dependentSchemas"]["coupon"]
    assert "additionalProperties" not in dependent and dependent["properties"]["meta"]["additionalProperties"] is False
    assert "additionalProperties" not in close_objects({"properties": {"a": {}}, "dependencies": {"a": {
        "properties": {"b": {}}}}})["dependencies"]["a"]
    tok, info = tokenizer_info_for(tiny_model_cached("qwen2"))
    matcher = get_backend("llguidance").compile(ConstraintSpec.json_schema(schema), info).new_matcher()
    assert _accepts(matcher, tok.encode('{"coupon": "SPRING", "discount": 5}', add_special_tokens=False))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_tool_without_parameters_takes_no_arguments(backend: str) -> None:
    """OpenAI: "Omitting parameters defines a function with an empty parameter list"; xgrammar's strict
    mode compiles `{"type": "object", "properties": {}}` to `{}` alone. llguidance took any object there."""
    assert close_objects({"type": "object", "properties": {}})["additionalProperties"] is False
    assert "additionalProperties" not in close_objects({"type": "object", "properties": {}, "required": ["a"]})
    tok, info = tokenizer_info_for(tiny_model_cached("qwen2"))
    for declared in ({}, {"parameters": {}}, {"parameters": {"type": "object", "properties": {}}}):
        tools = [{"type": "function", "function": {"name": "now", **declared}}]
        spec = build_tool_constraint(tools, "required", "hermes", parallel=False)
        for args, ok in (("{}", True), ('{"timezone": "UTC"}', False)):
            text = f'<tool_call>\n{{"name": "now", "arguments": {args}}}\n</tool_call>'
            matcher = get_backend(backend).compile(spec, info).new_matcher()
            assert _accepts(matcher, tok.encode(text, add_special_tokens=False)) == ok, (declared, text)
