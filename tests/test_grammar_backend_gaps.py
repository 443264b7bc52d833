"""What each backend got wrong on schemas and constraints outside the 350 (found by random walks validated with
jsonschema, each fixed where the backend is prepared): xgrammar refused every newline, tab and CR of a regex,
choice or grammar (the JSON-only control-character ban reached them) and ignored numeric bounds on a schema
without "type"; llguidance rounded number bounds past 2**53 (now moved inward to a double); xgrammar and outlines refused discriminated
unions that one_of.py proves exclusive; tool parameters typed ["object", "null"] let a call's arguments be
null or a string."""

from __future__ import annotations

import json
import random
import re

import pytest

from agentserve.grammar.interface import GrammarError
from agentserve.grammar.registry import get_backend
from agentserve.grammar.spec import ConstraintSpec
from agentserve.grammar.tool_schema import normalize_tool_schema
from agentserve.testing.tiny import tiny_model_cached
from helpers.grammar_walks import available_backends, decode, random_walk, schema_walks, tokenizer_info_for

BACKENDS = available_backends()


@pytest.fixture(scope="module")
def info():  # type: ignore[no-untyped-def]
    return tokenizer_info_for(tiny_model_cached("qwen2"))[1]  # byte-level: "\n" and "\t" are tokens


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec, valid", [
    (ConstraintSpec.choice(["x\ny", "tab\there"]), lambda t: t in ("x\ny", "tab\there")),
    (ConstraintSpec.regex(r"[a-z]{2}\n[a-z]{2}\r?\t"), lambda t: re.fullmatch(r"[a-z]{2}\n[a-z]{2}\r?\t", t)),
    (ConstraintSpec.grammar('root ::= "line1\\nline2"'), lambda t: t == "line1\nline2"),
])
def test_a_multi_line_regex_choice_or_grammar_is_generated(backend: str, spec: ConstraintSpec, valid, info) -> None:  # type: ignore[no-untyped-def]
    try:
        compiled = get_backend(backend).compile(spec, info)
    except GrammarError:
        if spec.kind == "grammar" and backend == "outlines":
            pytest.skip("outlines takes no GBNF")
        raise
    for seed in range(6):
        walk = random_walk(compiled.new_matcher(), random.Random(seed), max_tokens=40)
        assert walk.finished, (backend, spec.kind, seed)
        assert valid(decode(info, walk.tokens)), (backend, decode(info, walk.tokens))


@pytest.mark.skipif("xgrammar" not in BACKENDS, reason="xgrammar not installed")
@pytest.mark.parametrize("schema", [{"type": "object", "properties": {"x": {"minimum": 5, "maximum": 6}},
                                     "required": ["x"]}, {"exclusiveMinimum": 0, "exclusiveMaximum": 1}])
def test_xgrammar_refuses_bounds_without_a_type(schema: dict, info) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(GrammarError, match="minimum / maximum only on a schema with \"type\""):
        get_backend("xgrammar").compile(ConstraintSpec.json_schema(schema), info)
    typed = {"type": "integer", "minimum": 5, "maximum": 6}
    get_backend("xgrammar").compile(ConstraintSpec.json_schema(typed), info)  # with the type: enforced


@pytest.mark.skipif("llguidance" not in BACKENDS, reason="llguidance not installed")
@pytest.mark.parametrize("schema", [
    {"type": "integer", "minimum": 2 ** 53 + 1, "maximum": 2 ** 53 + 3},  # let 2**53 through
    {"type": "integer", "exclusiveMinimum": 2 ** 53 + 1, "maximum": 2 ** 53 + 6},
    {"type": "integer", "minimum": -(2 ** 63), "maximum": 2 ** 63 - 1},  # int64 fields' own limits
    {"type": "number", "maximum": -(2 ** 53) - 1},
])
def test_llguidance_keeps_bounds_past_2_53_inside(schema: dict, info) -> None:  # type: ignore[no-untyped-def]
    """llguidance reads bounds as doubles (integers within int64): such bounds move inward to a double, and every
    output validates."""
    compiled = get_backend("llguidance").compile(ConstraintSpec.json_schema(schema), info)
    walks = schema_walks(compiled, schema, walks=8, max_tokens=30, seed=1)["walks"]
    assert {w["status"] for w in walks} <= {"valid", "cap"}, [w for w in walks if w["status"] != "valid"]
    assert any(w["status"] == "valid" for w in walks)


def test_only_the_bounds_past_2_53_move() -> None:
    """A bound within 2**53 is a double already and may be a fraction or exclusive: it stays as it is beside a
    large one (an exclusiveMinimum 0 read as the double past it, as an integer, would have admitted 0)."""
    from agentserve.grammar.number_bounds import bounds_as_doubles

    for small in ({"exclusiveMinimum": 0}, {"minimum": 0.5}, {"exclusiveMinimum": -1.25}):
        assert bounds_as_doubles({"type": "number", **small, "maximum": 2 ** 60}, "llguidance") == \
            {"type": "number", **small, "maximum": 2 ** 60}
    assert bounds_as_doubles({"exclusiveMinimum": 2 ** 53 + 1, "maximum": 2 ** 53 + 1.5}, "llguidance") == \
        {"minimum": 2 ** 53 + 2, "maximum": 2 ** 53 + 2}


@pytest.mark.skipif("llguidance" not in BACKENDS, reason="llguidance not installed")
def test_llguidance_refuses_bounds_no_int64_number_fits(info) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(GrammarError, match="no number of that range fits them"):  # it wrote 2**63 - 1
        get_backend("llguidance").compile(ConstraintSpec.json_schema({"type": "integer", "minimum": 10 ** 19}), info)


PETS = {"Cat": {"type": "object", "properties": {"kind": {"const": "cat"}, "lives": {"type": "integer"}},
                "required": ["kind", "lives"], "additionalProperties": False},
        "Dog": {"type": "object", "properties": {"kind": {"const": "dog"}, "name": {"type": "string", "maxLength": 8}},
                "required": ["kind", "name"], "additionalProperties": False}}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("schema", [
    {"$defs": PETS, "type": "object", "properties": {"pet": {"oneOf": [{"$ref": "#/$defs/Cat"}, {"$ref": "#/$defs/Dog"}]}},
     "required": ["pet"], "additionalProperties": False},
    {"oneOf": [PETS["Cat"], PETS["Dog"]]},
])
def test_a_discriminated_union_compiles_and_its_outputs_validate(backend: str, schema: dict, info) -> None:  # type: ignore[no-untyped-def]
    compiled = get_backend(backend).compile(ConstraintSpec.json_schema(schema), info)
    walks = schema_walks(compiled, schema, walks=12, max_tokens=60, seed=3)["walks"]
    assert {w["status"] for w in walks} <= {"valid", "cap"}, [w for w in walks if w["status"] not in ("valid", "cap")]
    assert any(w["status"] == "valid" for w in walks)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_union_that_is_not_exclusive_is_still_refused_where_oneof_is_anyof(backend: str, info) -> None:  # type: ignore[no-untyped-def]
    schema = {"oneOf": [{"type": "integer"}, {"type": "number", "minimum": 0}]}  # 3 matches both
    if backend == "llguidance":
        pytest.skip("llguidance refuses every oneOf it cannot rewrite (test_grammar_exact_any_of.py)")
    with pytest.raises(GrammarError, match="oneOf"):
        get_backend(backend).compile(ConstraintSpec.json_schema(schema), info)


@pytest.mark.parametrize("typed", [["object", "null"], ["null", "object", "string"]])
def test_tool_parameters_typed_object_or_other_are_narrowed_to_object(typed: list) -> None:
    """A call's arguments are a JSON object (OpenAI, vLLM; clients call f(**json.loads(arguments))): the other
    types of a list are dropped, never written."""
    out = normalize_tool_schema({"type": typed, "properties": {"city": {"type": "string"}}})
    assert out["type"] == "object" and json.loads(json.dumps(out))["properties"] == {"city": {"type": "string"}}
