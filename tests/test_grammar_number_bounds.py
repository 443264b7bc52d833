"""Number ranges with no integer strictly inside and an exclusive bound at an integer: llguidance let that
integer through (1 for `{"exclusiveMinimum": 1, "exclusiveMaximum": 1.5}`, -1 for `{"minimum": -1.5,
"exclusiveMaximum": -1}`). Every backend now writes numbers inside the range, or refuses the schema naming
the keyword (grammar/number_bounds.py)."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest

from agentserve.grammar.compiler import GrammarCompiler
from agentserve.grammar.interface import GrammarError
from agentserve.grammar.number_bounds import STEP, exclusive_integer_bounds_stepped
from agentserve.grammar.registry import get_backend
from agentserve.grammar.spec import ConstraintSpec
from agentserve.testing.tiny import tiny_model_cached
from helpers.grammar_walks import available_backends, decode, random_walk, tokenizer_info_for

RANGES = [{"exclusiveMinimum": 1, "exclusiveMaximum": 1.5}, {"minimum": -1.5, "exclusiveMaximum": -1},
          {"exclusiveMinimum": 1, "maximum": 1.5}, {"exclusiveMinimum": 0.5, "exclusiveMaximum": 1},
          {"minimum": 2, "exclusiveMaximum": 3}, {"exclusiveMinimum": -1, "maximum": 2.5}]


@pytest.fixture(scope="module")
def info():
    return tokenizer_info_for(tiny_model_cached("qwen2"))[1]


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("bounds", RANGES, ids=json.dumps)
def test_numbers_stay_inside_their_range(info, backend: str, bounds: dict) -> None:
    schema = {"type": "object", "properties": {"x": {"type": "number", **bounds}}, "required": ["x"]}
    try:
        compiled = GrammarCompiler(get_backend(backend), info, timeout_s=30.0).compile(ConstraintSpec.json_schema(schema))
    except GrammarError as refused:
        assert backend == "outlines" and "imum" in str(refused), refused  # outlines enforces no bounds
        return
    walks = [random_walk(compiled.new_matcher(), random.Random(s), max_tokens=30, eos_prob=0.9) for s in range(60)]
    values = [json.loads(decode(info, w.tokens)) for w in walks if w.finished]
    assert values
    for value in values:
        jsonschema.validate(value, schema)


def test_only_integral_exclusive_bounds_of_integer_free_ranges_move() -> None:
    assert exclusive_integer_bounds_stepped({"type": "number", "exclusiveMinimum": 1, "exclusiveMaximum": 1.5}) == \
        {"type": "number", "minimum": 1 + STEP, "exclusiveMaximum": 1.5}
    assert exclusive_integer_bounds_stepped({"type": ["number", "null"], "minimum": -1.5, "exclusiveMaximum": -1}) == \
        {"type": ["number", "null"], "minimum": -1.5, "maximum": -1 - STEP}
    for kept in ({"type": "number", "exclusiveMinimum": 1, "maximum": 2.5},  # 2 lies inside
                 {"type": "integer", "exclusiveMinimum": 1, "exclusiveMaximum": 3},
                 {"type": "number", "exclusiveMinimum": 1},
                 {"type": "number", "exclusiveMinimum": 1e12, "exclusiveMaximum": 1e12 + 0.5}):  # too large to step
        assert exclusive_integer_bounds_stepped(kept) == kept
