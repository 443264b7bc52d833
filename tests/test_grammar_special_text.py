"""Strings a schema forces (const, enum values, property names, tool names) that contain the text of
one of the tokenizer's added tokens ('<|im_start|>', '<tool_call>'): llguidance writes forced text with
the tokenizer, which turns that text into the added token, and then refuses the token it allowed, so
the request failed in the step (a 500 "sampled token ... is not allowed"). Such a constraint is refused
when it is compiled, naming the string; others compile, and every token their mask allows is accepted."""

from __future__ import annotations

import random

import pytest

from agentserve.grammar.compiler import GrammarCompiler
from agentserve.grammar.interface import GrammarError
from agentserve.grammar.registry import get_backend
from agentserve.grammar.spec import ConstraintSpec, build_tool_constraint
from agentserve.testing.tiny import tiny_model_cached
from helpers.grammar_walks import random_walk, tokenizer_info_for


@pytest.fixture(scope="module")
def compiler() -> GrammarCompiler:
    info = tokenizer_info_for(tiny_model_cached("qwen2"))[1]  # added: <|im_start|>, <tool_call>, ...
    return GrammarCompiler(get_backend("llguidance"), info, timeout_s=30.0)


def _obj(prop: dict) -> dict:
    return {"type": "object", "properties": {"k": prop}, "required": ["k"]}


@pytest.mark.parametrize("schema", [_obj({"const": "<|im_start|>"}), _obj({"enum": ["a<tool_call>b"]}),
                                    {"type": "object", "properties": {"</tool_call>": {"type": "boolean"}},
                                     "required": ["</tool_call>"]}])
def test_forced_text_with_an_added_token_is_refused(compiler: GrammarCompiler, schema: dict) -> None:
    with pytest.raises(GrammarError, match="added token"):
        compiler.compile(ConstraintSpec.json_schema(schema))


def test_a_tool_name_with_an_added_token_is_refused(compiler: GrammarCompiler) -> None:
    tools = [{"type": "function", "function": {"name": "</tool_call>", "parameters": {}}}]
    with pytest.raises(GrammarError, match="'</tool_call>'"):
        compiler.compile(build_tool_constraint(tools, "required", "hermes"))


def test_forced_text_without_an_added_token_still_compiles(compiler: GrammarCompiler) -> None:
    compiled = compiler.compile(ConstraintSpec.json_schema(_obj({"enum": ["<b>", "tool_call", "<|x|>"]})))
    for seed in range(8):  # each walk takes only allowed tokens: a refused one fails the walk
        assert random_walk(compiled.new_matcher(), random.Random(seed), max_tokens=60).finished


# Patterns, regexes, choices and grammar strings force text the same way: each of these failed in the
# step ("matcher refused token ... that its own mask allowed") before it was refused at compile time.
@pytest.mark.parametrize("schema, where", [
    (_obj({"type": "string", "pattern": "^<tool_call>$"}), r"\$.properties.k.pattern"),
    (_obj({"type": "string", "pattern": r"^a<tool_(call>[a-z])$"}), r"\$.properties.k.pattern"),
    (_obj({"type": "string", "pattern": r"^\x3ctool_call>{1}$"}), r"\$.properties.k.pattern"),
    (_obj({"type": "string", "pattern": r"^[<]\|im_start\|>$"}), r"\$.properties.k.pattern"),
    ({"type": "object", "patternProperties": {"^<tool_call>$": {"type": "integer"}}, "minProperties": 1,
      "additionalProperties": False}, r"\$.patternProperties"),
])
def test_a_pattern_that_writes_an_added_token_is_refused(compiler: GrammarCompiler, schema: dict, where: str) -> None:
    with pytest.raises(GrammarError, match=rf"\(at {where}\): it contains the text of the added token"):
        compiler.compile(ConstraintSpec.json_schema(schema))


@pytest.mark.parametrize("spec, where", [
    (ConstraintSpec.regex("a<tool_call>[0-9]"), "the regex"),
    (ConstraintSpec.choice(["x", "a<|im_start|>"]), r"choice\[1\]"),
    (ConstraintSpec.grammar('root ::= "a<tool_call>b"'), "a quoted string of the grammar"),
    (ConstraintSpec.grammar('start: "<tool_call>" /[a-z]/'), "a quoted string of the grammar"),
])
def test_a_regex_choice_or_grammar_that_writes_an_added_token_is_refused(compiler: GrammarCompiler,
                                                                         spec: ConstraintSpec, where: str) -> None:
    with pytest.raises(GrammarError, match=rf"\(at {where}\): it contains the text of the added token"):
        compiler.compile(spec)


@pytest.mark.parametrize("spec", [ConstraintSpec.json_schema(_obj({"type": "string", "pattern": "^<tool_cal+>$"})),
                                  ConstraintSpec.regex("<b>[a-z]tool_call"), ConstraintSpec.choice(["<b>", "x"])])
def test_a_pattern_that_only_comes_near_an_added_token_still_compiles(compiler: GrammarCompiler,
                                                                        spec: ConstraintSpec) -> None:
    compiled = compiler.compile(spec)
    for seed in range(8):
        assert random_walk(compiled.new_matcher(), random.Random(seed), max_tokens=60).finished
