"""Draft-4 exclusive bounds (`"maximum": 5, "exclusiveMaximum": true`): xgrammar failed such a schema with
"Value must be a number", naming no keyword. A schema that declares draft 4 now compiles where its bounds
are enforced, and its outputs validate under draft 4; a boolean bound in a schema that does not declare
draft 4 (invalid under its own draft) is refused, naming the keyword and the numeric form to write."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest

from agentserve.grammar.compiler import GrammarCompiler
from agentserve.grammar.interface import GrammarError
from agentserve.grammar.registry import get_backend
from agentserve.grammar.spec import ConstraintSpec, build_tool_constraint
from agentserve.testing.tiny import tiny_model_cached
from helpers.grammar_walks import available_backends, decode, random_walk, tokenizer_info_for

DRAFT4 = "http://json-schema.org/draft-04/schema#"
# 3 < x < 5 for an integer: 4 is the only value, so a bound read as inclusive shows at once.
DRAFT4_OPEN_INTERVAL = {"$schema": DRAFT4, "type": "object", "required": ["x"], "properties": {
    "x": {"type": "integer", "minimum": 3, "exclusiveMinimum": True, "maximum": 5, "exclusiveMaximum": True}}}
DRAFT4_CLOSED_INTERVAL = {"$schema": DRAFT4, "type": "integer", "minimum": 3, "exclusiveMinimum": False,
                          "maximum": 4, "exclusiveMaximum": False}


@pytest.fixture(scope="module")
def info():
    return tokenizer_info_for(tiny_model_cached("qwen2"))[1]


def _outputs(compiler: GrammarCompiler, spec: ConstraintSpec, seeds: int = 6) -> list[str]:
    compiled = compiler.compile(spec)
    walks = [random_walk(compiled.new_matcher(), random.Random(s), max_tokens=40) for s in range(seeds)]
    return [decode(compiled.tokenizer_info, w.tokens) for w in walks if w.finished]


@pytest.mark.parametrize("backend", [b for b in ("xgrammar", "llguidance") if b in available_backends()])
@pytest.mark.parametrize("schema", [DRAFT4_OPEN_INTERVAL, DRAFT4_CLOSED_INTERVAL])
def test_draft4_boolean_bounds_are_enforced(info, backend: str, schema: dict) -> None:
    outputs = _outputs(GrammarCompiler(get_backend(backend), info, timeout_s=30.0), ConstraintSpec.json_schema(schema))
    assert outputs
    for text in outputs:
        jsonschema.Draft4Validator(schema).validate(json.loads(text))


@pytest.mark.skipif("outlines" not in available_backends(), reason="outlines-core not installed")
def test_outlines_names_the_bound_it_does_not_enforce(info) -> None:
    with pytest.raises(GrammarError, match="exclusiveMinimum|exclusiveMaximum"):
        GrammarCompiler(get_backend("outlines"), info).compile(ConstraintSpec.json_schema(DRAFT4_OPEN_INTERVAL))


@pytest.mark.parametrize("schema", [{k: v for k, v in DRAFT4_OPEN_INTERVAL.items() if k != "$schema"},
                                    {**DRAFT4_OPEN_INTERVAL, "$schema": "https://json-schema.org/draft/2020-12/schema"}])
def test_a_boolean_bound_outside_draft4_names_the_keyword_and_the_fix(schema: dict) -> None:
    with pytest.raises(GrammarError, match=r"'(exclusiveM\w+)' \(at properties.x\) is a boolean.*"
                                           r"'\"\1\": <number>'"):
        ConstraintSpec.json_schema(schema)


def test_a_true_bound_without_its_inclusive_bound_is_refused() -> None:
    with pytest.raises(GrammarError, match="'exclusiveMaximum': true .* needs a numeric 'maximum'"):
        ConstraintSpec.json_schema({"$schema": DRAFT4, "type": "number", "exclusiveMaximum": True})


def test_tool_parameters_with_a_boolean_bound_name_the_tool() -> None:
    params = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 9, "exclusiveMaximum": True}}}
    tools = [{"type": "function", "function": {"name": "f", "parameters": params}}]
    with pytest.raises(GrammarError, match=r"tools\[0\].function.parameters.properties.n"):
        build_tool_constraint(tools, "required", "hermes")


@pytest.mark.skipif("xgrammar" not in available_backends(), reason="xgrammar not installed")
def test_xgrammar_errors_carry_no_log_time_or_source_line(info) -> None:
    # xgrammar's own message began "[12:23:42] /project/cpp/json_schema_converter.cc:3562: ..."
    with pytest.raises(GrammarError) as refused:
        GrammarCompiler(get_backend("xgrammar"), info).compile(ConstraintSpec.json_schema({"$ref": "#"}))
    assert str(refused.value).startswith("xgrammar cannot compile json_schema: Circular $ref"), refused.value
