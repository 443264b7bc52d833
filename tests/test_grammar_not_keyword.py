"""`not` that a grammar can keep exact (agentserve/grammar/not_keyword.py): llguidance refused every `not`,
failing the whole request for a schema that says "any value but null" or "never" in one branch. Each
rewritten form must be the same set of values: sampled outputs validate against the ORIGINAL schema
(jsonschema), and what has no positive form is still refused, naming `not`."""

from __future__ import annotations

import json

import jsonschema
import pytest

from agentserve import SamplingParams
from agentserve.grammar.not_keyword import not_as_positive
from agentserve.llm import LLM
from helpers.grammar_walks import assert_sampled_outputs_validate

SMALL = {"type": "integer", "minimum": 0, "maximum": 9}
# A value that is anything but null or a string, inside bounds the random tiny model can finish.
NOT_NULL = {"type": "object", "required": ["v"], "additionalProperties": False, "properties": {
    "v": {"type": ["integer", "boolean", "null", "string"], "not": {"type": ["null", "string"]},
          "minimum": 0, "maximum": 9}}}
# One branch that can never match (a 'function' a JSON value cannot be), as a real proxy config schema says it.
NEVER_BRANCH = {"type": "object", "required": ["mode"], "additionalProperties": False, "properties": {
    "mode": {"anyOf": [{"type": "string", "enum": ["body", "full"]},
                       {"description": "a function", "not": {"type": ["string", "number", "array", "object",
                                                                      "boolean", "null"]}}]}}}
# Without a coupon: the property must be absent.
NO_COUPON = {"type": "object", "required": ["item"], "additionalProperties": False, "not": {"required": ["coupon"]},
             "properties": {"item": {"type": "string", "maxLength": 6}, "coupon": {"type": "string"},
                            "count": SMALL}}


def test_the_positive_forms() -> None:
    assert not_as_positive({"not": {"type": "null"}}) == {"type": ["boolean", "object", "array", "number", "string"]}
    assert not_as_positive({"type": ["integer", "null"], "not": {"type": "null", "title": "t"}}) == {"type": "integer"}
    assert not_as_positive({"type": "number", "not": {"type": "number"}}) is False
    assert not_as_positive({"anyOf": [{"type": "string"}, {"not": {}}]}) == {"anyOf": [{"type": "string"}, False]}
    assert not_as_positive({"minimum": 1, "not": False}) == {"minimum": 1}
    assert not_as_positive({"not": True}) is False
    assert not_as_positive(NO_COUPON)["properties"]["coupon"] is False
    assert not_as_positive({"type": "object", "required": ["a"], "not": {"required": ["a"]}}) is False
    for kept in ({"not": {"type": "integer"}},               # "a number but not an integer" has no type
                 {"not": {"enum": ["a"]}},                    # no positive form for "any value but these"
                 {"not": {"required": ["a"]}},                # a non-object also matches: not an object-only form
                 {"type": "object", "not": {"required": ["a", "b"]}},
                 {"not": {"type": "string", "minLength": 2}}):
        assert not_as_positive(kept) == kept



@pytest.mark.parametrize("schema", [NOT_NULL, NEVER_BRANCH, NO_COUPON], ids=["not-null", "never-branch", "absent"])
def test_sampled_outputs_validate_against_the_original_schema(grammar_llm: LLM, schema: dict) -> None:
    assert_sampled_outputs_validate(grammar_llm, schema, seed=11, max_tokens=120)


def test_a_not_without_a_positive_form_is_still_refused(grammar_llm: LLM) -> None:
    schema = {"type": "object", "properties": {"x": {"type": "string", "not": {"enum": ["admin"]}}}}
    with pytest.raises(ValueError, match="not"):  # vLLM's offline API refuses it before queueing
        grammar_llm.generate("x", SamplingParams(max_tokens=8, json_schema=schema))
    grammar_llm.engine.pool.check_all_free()


def test_tool_parameters_with_not_and_dependencies(grammar_llm: LLM) -> None:
    """Tool schemas reach the backend with `not` and `dependencies` (they were refused as "unsupported" before
    the backend was asked): llguidance compiles the exact forms, every call validates against the original."""
    params = {"type": "object", "required": ["item", "qty"], "additionalProperties": False, "properties": {
        "item": {"type": "string", "maxLength": 6}, "qty": {**SMALL, "not": {"type": "null"}},
        "coupon": {"type": "string", "maxLength": 4}, "discount": SMALL},
        "dependencies": {"coupon": ["discount"]}}
    tool = {"type": "function", "function": {"name": "order", "parameters": params}}
    outs = grammar_llm.chat([{"role": "user", "content": "Order two apples."}], SamplingParams(
        n=6, temperature=1.0, seed=5, max_tokens=120, parallel_tool_calls=False), tools=[tool],
        tool_choice="required")[0].outputs
    calls = [c for c in outs if c.finish_reason == "stop"]
    assert len(calls) >= 3, [(c.finish_reason, c.text) for c in outs]
    for c in calls:
        body = c.text[c.text.index("{"):c.text.rindex("}") + 1]  # Qwen's <tool_call>{...}</tool_call>
        jsonschema.validate(json.loads(body)["arguments"], params)
