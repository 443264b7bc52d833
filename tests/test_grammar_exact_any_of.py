"""`oneOf` and `dependencies` that a grammar can keep exact (agentserve/grammar/one_of.py, dependent_keywords.py).

llguidance refused every `oneOf`, so a
tool whose parameters choose between argument sets (`{"oneOf": [{"required": ["radius"]}, {"required":
["length", "width"]}]}`, common in function-calling datasets) or a discriminated union failed the whole
request. Those are rewritten as `anyOf` where no generated value can match two branches; every sampled output
must validate against the ORIGINAL schema (jsonschema, oneOf semantics), and what cannot be proven exclusive
is still refused. It refused `dependencies` ("if P then Q") too, which is exactly "P absent, or Q": an anyOf."""

from __future__ import annotations

import json

import jsonschema
import pytest

from agentserve import SamplingParams
from agentserve.grammar.dependent_keywords import dependencies_as_any_of
from agentserve.grammar.one_of import one_of_as_any_of
from agentserve.llm import LLM
from helpers.grammar_walks import assert_sampled_outputs_validate

SIZE = {"type": "integer", "minimum": 1, "maximum": 99}  # bounded, so that the random tiny model's numbers end
AREA = {"type": "object", "required": ["shape", "dimensions"], "properties": {
    "shape": {"type": "string", "enum": ["circle", "rectangle", "triangle"]},
    "dimensions": {"type": "object", "properties": {
        "radius": SIZE, "length": SIZE, "width": SIZE, "base": SIZE, "height": SIZE},
        "oneOf": [{"required": ["radius"]}, {"required": ["length", "width"]}, {"required": ["base", "height"]}]}}}
SHAPES = {"type": "object", "required": ["shape"], "properties": {"shape": {"oneOf": [
    {"type": "object", "required": ["kind", "radius"], "additionalProperties": False,
     "properties": {"kind": {"const": "circle"}, "radius": {"type": "integer", "minimum": 1, "maximum": 9}}},
    {"$ref": "#/$defs/square"},
    {"type": "string", "enum": ["none", "unknown"]}]}},
    "$defs": {"square": {"type": "object", "required": ["kind", "side"], "additionalProperties": False,
                         "properties": {"kind": {"enum": ["square", "box"]}, "side": {"type": "integer"}}}}}


def test_exclusive_branches_become_any_of_and_the_rest_stays() -> None:
    assert one_of_as_any_of({"oneOf": [{"type": "string"}, {"type": "integer"}]}) == {
        "anyOf": [{"type": "string"}, {"type": "integer"}]}
    assert "anyOf" in one_of_as_any_of(SHAPES)["properties"]["shape"]  # discriminator read through the $ref
    area = one_of_as_any_of(AREA)["properties"]["dimensions"]
    assert "oneOf" not in area and area["anyOf"][0] == {
        "required": ["radius"], "properties": {"length": False, "width": False, "base": False, "height": False}}
    for kept in ({"oneOf": [{"type": "integer"}, {"type": "number"}]},           # integers are numbers
                 {"oneOf": [{"enum": ["a", "b"]}, {"enum": ["b", "c"]}]},        # "b" matches both
                 {"oneOf": [{"required": ["a"]}, {"required": ["a", "b"]}]},     # one set holds the other
                 {"oneOf": [{"properties": {"a": {}}}, {"properties": {"b": {}}}]},  # {} matches both
                 {"oneOf": [{"pattern": "^a"}, {"pattern": "b$"}]}):
        assert one_of_as_any_of(kept) == kept


ORDER = {"type": "object", "required": ["item"], "additionalProperties": False, "properties": {
    "item": {"type": "string", "maxLength": 8}, "coupon": {"type": "string", "maxLength": 8},
    "discount": {"type": "integer", "minimum": 1, "maximum": 50}},
    "dependencies": {"coupon": ["discount"]}}


def test_dependencies_become_the_any_of_they_mean() -> None:
    assert dependencies_as_any_of({"properties": {"a": {}}, "dependencies": {"a": ["b"]}}) == {
        "properties": {"a": {}}, "anyOf": [{"properties": {"a": False}}, {"required": ["b"]}]}
    assert dependencies_as_any_of({"dependentSchemas": {"a": {"required": ["c"]}}}) == {
        "anyOf": [{"properties": {"a": False}}, {"required": ["c"]}]}
    # P required by the object itself: the dependency always applies.
    assert dependencies_as_any_of({"required": ["a"], "dependentRequired": {"a": ["b"]}}) == {"required": ["a", "b"]}
    for kept in ({"dependencies": {"a": ["b"], "c": ["d"]}},                    # several: would need allOf
                 {"anyOf": [{}], "dependencies": {"a": ["b"]}},                 # an anyOf of its own
                 {"dependencies": {"a": {"oneOf": [{"required": ["x"]}, {"required": ["x", "y"]}]}}}):
        assert dependencies_as_any_of(kept) == kept



@pytest.mark.parametrize("schema", [AREA, SHAPES, ORDER], ids=["required-sets", "discriminated", "dependencies"])
def test_sampled_outputs_validate_against_the_original_one_of(grammar_llm: LLM, schema: dict) -> None:
    assert_sampled_outputs_validate(grammar_llm, schema, seed=7, max_tokens=200)


def test_a_tool_choosing_between_argument_sets_is_called_with_one_set(grammar_llm: LLM) -> None:
    tool = {"type": "function", "function": {"name": "calculate_area", "description": "Area of a shape.",
                                             "parameters": AREA}}
    params = SamplingParams(n=6, temperature=1.0, seed=3, max_tokens=200)
    outs = grammar_llm.chat([{"role": "user", "content": "Area of a circle of radius 2?"}], params, tools=[tool],
                    tool_choice="required")[0].outputs
    calls = [c for c in outs if c.finish_reason == "stop"]
    assert calls
    for c in calls:
        body = c.text[c.text.index("{"):c.text.rindex("}") + 1]  # Qwen's <tool_call>{...}</tool_call>
        jsonschema.validate(json.loads(body)["arguments"], AREA)


def test_a_one_of_that_cannot_be_proven_exclusive_is_still_refused(grammar_llm: LLM) -> None:
    overlapping = {"type": "object", "properties": {"x": {"oneOf": [{"type": "integer"}, {"minimum": 0}]}}}
    with pytest.raises(ValueError, match="oneOf"):  # vLLM's offline API refuses it before queueing
        grammar_llm.generate("x", SamplingParams(max_tokens=8, json_schema=overlapping))
    grammar_llm.engine.pool.check_all_free()
