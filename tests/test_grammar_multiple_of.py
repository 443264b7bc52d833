"""`multipleOf` on numbers: xgrammar compiled it with "Warning: multipleOf is not supported for type:number;
ignoring multipleOf" and wrote 5.3404 for `{"type": "number", "multipleOf": 0.5}`, and dropped it silently beside
a bound on integers. Every backend now either
enforces it (every output validates) or refuses the schema naming the keyword."""

from __future__ import annotations

import json
import random
import re

import jsonschema
import pytest

from agentserve.grammar.compiler import GrammarCompiler
from agentserve.grammar.interface import GrammarError
from agentserve.grammar.registry import get_backend
from agentserve.grammar.spec import ConstraintSpec, build_tool_constraint
from agentserve.testing.tiny import tiny_model_cached
from helpers.grammar_walks import available_backends, decode, random_walk, tokenizer_info_for

SCHEMAS = [{"type": "number", "multipleOf": 0.5}, {"type": "number", "multipleOf": 2}, {"multipleOf": 0.25},
           # xgrammar dropped it beside a bound without a word (5 for minimum -9, multipleOf 2)
           {"type": "integer", "minimum": -9, "multipleOf": 2}, {"type": "integer", "exclusiveMaximum": 50, "multipleOf": 5},
           {"type": "integer", "multipleOf": 3}]


@pytest.fixture(scope="module")
def info():
    return tokenizer_info_for(tiny_model_cached("qwen2"))[1]


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("schema", SCHEMAS, ids=json.dumps)
def test_multiple_of_is_enforced_or_refused_by_name(info, backend: str, schema: dict) -> None:
    wrapped = {"type": "object", "properties": {"x": schema}, "required": ["x"]}
    compiler = GrammarCompiler(get_backend(backend), info, timeout_s=30.0)
    try:
        compiled = compiler.compile(ConstraintSpec.json_schema(wrapped))
    except GrammarError as refused:
        assert re.search("multipleOf|imum", str(refused)), refused  # outlines names the bound it enforces neither
        with pytest.raises(GrammarError, match="multipleOf|imum"):  # a tool's parameters likewise
            compiler.compile(build_tool_constraint([{"type": "function", "function": {
                "name": "f", "parameters": wrapped}}], "required", "hermes"))
        return
    walks = [random_walk(compiled.new_matcher(), random.Random(s), max_tokens=30) for s in range(30)]
    values = [json.loads(decode(info, w.tokens)) for w in walks if w.finished]
    assert values
    for value in values:
        jsonschema.validate(value, wrapped)


def test_xgrammar_keeps_multiple_of_on_integers(info) -> None:
    if "xgrammar" not in available_backends():
        pytest.skip("xgrammar not installed")
    GrammarCompiler(get_backend("xgrammar"), info).compile(ConstraintSpec.json_schema(SCHEMAS[-1]))
