"""outlines-core expands a recursive schema into one regex, `max_recursion_depth` levels deep: each level
multiplies its size. A real schema (Github_medium/o33692 of the sample: 18 optional properties and an
array of itself) made a 1 GB regex at depth 2 and more than 15 GB at depth 3, the default: the compile
thread (which the time limit cannot stop) took the server's memory until the OS killed the process.
Such a schema must be refused at once, with a message that says why, and nothing else may suffer."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers.grammar_walks import available_backends

# o33692 without its descriptions: 18 optional properties, four of them free-form objects, and
# `alternatives`: an array of the whole schema ("$ref": "#").
RECURSIVE = {"type": "object", "properties": {
    "method": {"type": "string", "enum": ["GET", "POST", "PUT", "DELETE", "PATCH"]}, "delay": {"type": "integer"},
    "name": {"type": "string"}, "description": {"type": "string"}, "category": {"type": "string"},
    "getParameters": {"type": "object"}, "postParameters": {"type": "object"}, "postJson": {"type": "object"},
    "responseCode": {"type": "integer"}, "alternatives": {"type": "array", "items": {"$ref": "#"}},
    "generates": {"type": "string", "enum": ["indexPage", "fileList", "commandConsole"]},
    "redirect": {"type": "string"}, "generatesJson": {"type": "boolean"}, "includeSHA256": {"type": "boolean"},
    "hidden": {"type": "boolean"}, "responsePath": {"type": "string"}, "checkHeaders": {"type": "object"}}}
SMALL_RECURSIVE = {"type": "object", "properties": {"leaf": {"type": "boolean"},
                                                    "kids": {"type": "array", "items": {"$ref": "#"}}},
                   "required": ["leaf"]}

_CHILD = textwrap.dedent("""
    import json, resource, sys, time
    sys.path.insert(0, sys.argv[2])  # tests/, for helpers
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))  # a failure must not take the machine down
    from agentserve.grammar.interface import GrammarError
    from agentserve.grammar.registry import get_backend
    from agentserve.grammar.spec import ConstraintSpec
    from agentserve.testing.tiny import tiny_model_cached
    from helpers.grammar_walks import tokenizer_info_for
    info = tokenizer_info_for(tiny_model_cached("llama3"))[1]
    start = time.perf_counter()
    try:
        get_backend("outlines").compile(ConstraintSpec.json_schema(json.loads(sys.argv[1])), info)
        print(json.dumps({"status": "compiled", "s": time.perf_counter() - start}))
    except GrammarError as e:
        print(json.dumps({"status": "refused", "error": str(e), "s": time.perf_counter() - start}))
""")


def _compile_in_child(schema: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(schema), str(Path(__file__).parent)],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"the compile crashed (rc {proc.returncode}): {proc.stderr[-1500:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif("outlines" not in available_backends(), reason="outlines-core not installed")
def test_exploding_recursive_schema_is_refused_at_once() -> None:
    result = _compile_in_child(RECURSIVE)
    assert result["status"] == "refused", result
    assert "recursi" in result["error"] and "llguidance" in result["error"], result["error"]
    assert result["s"] < 10, result


@pytest.mark.skipif("outlines" not in available_backends(), reason="outlines-core not installed")
def test_small_recursive_schema_still_compiles() -> None:
    assert _compile_in_child(SMALL_RECURSIVE)["status"] == "compiled"


def test_properties_that_allow_any_value() -> None:
    """Github_medium/o4263 of the sample: optional properties whose schema is `{}`. outlines-core wrote `{}` as
    an ungrouped alternation, so the object could go on with a bare value (`{"a":truenull}`, invalid JSON) and
    never with the property itself; walks through the compiled grammar are now valid JSON the schema accepts."""
    if "outlines" not in available_backends():
        pytest.skip("outlines-core is not installed")
    import re

    from agentserve.grammar.outlines_backend import schema_to_regex
    from agentserve.grammar.registry import get_backend
    from agentserve.grammar.spec import ConstraintSpec
    from agentserve.testing.tiny import tiny_model_cached
    from helpers.grammar_walks import schema_walks, tokenizer_info_for

    schema = {"type": "object", "properties": {"a": {"type": "boolean"}, "x": {}, "note": {"description": "free"},
                                               "b": {"type": "boolean"}}, "required": ["a"]}
    regex = schema_to_regex(schema)
    assert re.fullmatch(regex, '{"a":truenull}') is None
    for text in ['{"a":true,"x":null}', '{"a":true,"x":{"k":[1,"s"]},"note":2}', '{"a":false,"x":"s","b":true}']:
        assert re.fullmatch(regex, text), text
    tok, info = tokenizer_info_for(tiny_model_cached("llama3"))
    compiled = get_backend("outlines").compile(ConstraintSpec.json_schema(schema), info)
    walks = schema_walks(compiled, schema, tok, walks=12, max_tokens=300, seed=4263)["walks"]
    assert all(w["status"] in ("valid", "cap") for w in walks), walks
    assert sum(w["status"] == "valid" for w in walks) >= 6, walks


def test_recursion_through_a_required_property_is_refused() -> None:
    """At its recursion depth outlines-core writes the referenced object without its recursive properties; for
    a required one that is `{"label": "a", }` (a dangling comma, the property missing): walks broke the schema.
    Such a schema is refused, naming the property; one whose recursion runs through optional properties only
    still compiles, and its walks (which reach the depth) stay valid."""
    if "outlines" not in available_backends():
        pytest.skip("outlines-core is not installed")
    import random

    import jsonschema

    from agentserve.grammar.interface import GrammarError
    from agentserve.grammar.outlines_backend import schema_to_regex
    from agentserve.grammar.registry import get_backend
    from agentserve.grammar.spec import ConstraintSpec
    from agentserve.testing.tiny import tiny_model_cached
    from helpers.grammar_walks import decode, random_walk, tokenizer_info_for

    node = {"type": "object", "properties": {"label": {"type": "string", "maxLength": 4},
                                             "child": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}},
            "required": ["label", "child"], "additionalProperties": False}
    with pytest.raises(GrammarError, match="required property at properties.child refers back"):
        schema_to_regex(node)
    optional = {**node, "required": ["label"]}
    _, info = tokenizer_info_for(tiny_model_cached("qwen2"))
    compiled = get_backend("outlines").compile(ConstraintSpec.json_schema(optional), info)
    depths = []
    for seed in range(20):
        walk = random_walk(compiled.new_matcher(), random.Random(seed), max_tokens=600, eos_prob=0.3)
        if walk.finished:
            text = decode(info, walk.tokens)
            jsonschema.validate(json.loads(text), optional)
            depths.append(text.count("label"))
    assert len(depths) >= 10 and max(depths) >= 4  # some walks nested past the recursion depth

