"""xgrammar (0.2) lets raw control characters into a string with minLength/maxLength. JSON-schema grammars
refuse those tokens, but tool-call grammars must allow tab, LF and CR (text and whitespace around the
calls), so a tool call's argument came out as '"],,<TAB>"' (2 of 150 walks): invalid JSON, a call
the parser drops. Length-bounded strings of tool-call JSON are now written as JSON-safe patterns."""

from __future__ import annotations

import json
import random
import re

import jsonschema
import pytest

from agentserve.grammar.compiler import GrammarCompiler
from agentserve.grammar.registry import get_backend
from agentserve.grammar.spec import build_tool_constraint
from agentserve.testing.tiny import tiny_model_cached
from helpers.grammar_walks import available_backends, decode, random_walk, tokenizer_info_for

PARAMS = {"type": "object", "required": ["s", "u"], "properties": {
    "s": {"type": "string", "minLength": 2, "maxLength": 4}, "u": {"type": "string", "maxLength": 2}}}


@pytest.mark.skipif("xgrammar" not in available_backends(), reason="xgrammar not installed")
def test_length_bounded_tool_arguments_are_json() -> None:
    info = tokenizer_info_for(tiny_model_cached("qwen2"))[1]
    tools = [{"type": "function", "function": {"name": "f", "parameters": PARAMS}}]
    compiled = GrammarCompiler(get_backend("xgrammar"), info).compile(build_tool_constraint(tools, "required", "hermes"))
    calls = 0
    for seed in range(150):
        text = decode(info, random_walk(compiled.new_matcher(), random.Random(seed), max_tokens=200).tokens)
        for call in re.findall(r"<tool_call>(.*?)</tool_call>", text, re.S):
            jsonschema.validate(json.loads(call)["arguments"], PARAMS)  # a raw control character fails here
            calls += 1
    assert calls > 100
