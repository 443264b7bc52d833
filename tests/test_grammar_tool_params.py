"""Tool parameters as real schemas write them, compiled through the tool-call constraint: each tool
compiles wherever the same schema compiles as a response_format, and its calls' arguments validate."""

from __future__ import annotations

import json
import random
import re

import jsonschema
import pytest

from agentserve.grammar.compiler import GrammarCompiler
from agentserve.grammar.registry import get_backend
from agentserve.grammar.spec import ConstraintSpec, build_tool_constraint
from agentserve.testing.tiny import tiny_model_cached
from helpers.grammar_walks import available_backends, decode, random_walk, tokenizer_info_for

ITEM = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}}, "required": ["name"]}
# Parameters that name their own base URI ($id, or draft-4's id) and refer to their definitions: the
# references resolve against that URI, so they must keep working where the tool-call grammar puts them.
PARAMS_WITH_BASE_URI = {
    "draft7_id": {"$id": "https://example.com/items.schema.json", "$schema": "http://json-schema.org/draft-07/schema#",
                  "type": "object", "definitions": {"Item": ITEM},
                  "properties": {"items": {"type": "array", "items": {"$ref": "#/definitions/Item"}, "maxItems": 2}},
                  "required": ["items"]},
    "draft4_id": {"id": "https://example.com/defs.json", "$schema": "http://json-schema.org/draft-04/schema#",
                  "definitions": {"code": {"type": "string", "pattern": "^[a-z]{2}$"}},
                  "properties": {"code": {"$ref": "#/definitions/code"}}, "required": ["code"]},
    "root_ref": {"$id": "https://example.com/tree.json", "type": "object",
                 "properties": {"leaf": {"type": "boolean"}, "child": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}},
                 "required": ["leaf", "child"]},
}


@pytest.fixture(scope="module")
def info():
    return tokenizer_info_for(tiny_model_cached("qwen2"))[1]


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("name", sorted(PARAMS_WITH_BASE_URI))
def test_parameters_with_a_base_uri_compile_and_validate(backend: str, name: str, info) -> None:
    params = PARAMS_WITH_BASE_URI[name]
    compiler = GrammarCompiler(get_backend(backend), info, timeout_s=30.0)
    try:
        compiler.compile(ConstraintSpec.json_schema(params))
    except Exception:  # noqa: BLE001 - this backend refuses the schema itself: nothing to compare
        pytest.skip(f"{backend} does not compile {name} as a response_format either")
    tools = [{"type": "function", "function": {"name": "f", "parameters": params}}]
    compiled = compiler.compile(build_tool_constraint(tools, "required", "hermes", parallel=False))
    checked = 0
    for seed in range(4):
        walk = random_walk(compiled.new_matcher(), random.Random(seed), max_tokens=400)
        if not walk.finished:
            continue
        body = re.search(r"<tool_call>\s*(.*?)\s*</tool_call>", decode(info, walk.tokens), re.S)
        assert body is not None, decode(info, walk.tokens)
        jsonschema.validate(json.loads(body.group(1))["arguments"], params)
        checked += 1
    assert checked
