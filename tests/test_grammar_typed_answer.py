"""Tools with a typed final answer (json_schema / json_object beside tools, tool_choice "auto"): on
every backend and tool-call format, random walks through the constraint either end as calls that
parse and validate, or as one JSON answer that matches the schema and that the parser (told there is
a typed answer) keeps as content. Both branches are forced in turn by their first token."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest

from agentserve.grammar.registry import get_backend
from agentserve.grammar.spec import ConstraintSpec
from agentserve.grammar.tool_constraint import call_schemas_of
from agentserve.grammar.tool_formats import HERMES_OPEN, MISTRAL_OPEN, PYTHON_TAG
from agentserve.grammar.tool_parser import ToolCallParser
from agentserve.sampling_params import SamplingParams
from agentserve.testing.tiny import TOOL_CALL_FORMAT, tiny_model_cached
from helpers.grammar_walks import available_backends, decode, random_walk, tokenizer_info_for


BACKENDS = available_backends()
ARGS = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                         "days": {"type": "integer", "enum": ["1", "2"]}},
        "required": ["city"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": ARGS}}]
ANSWER = {"type": "object", "properties": {"sunny": {"type": "boolean"}, "note": {"type": "string", "maxLength": 6}},
          "required": ["sunny"], "additionalProperties": False}
OPENER = {"hermes": HERMES_OPEN, "llama3_json": PYTHON_TAG, "mistral": MISTRAL_OPEN}
ARCH_CASES = ["llama3", "mistral", "qwen2"]  # the three formats, each with its opener as one token


@pytest.fixture(scope="module")
def tokenizers():
    return {arch: tokenizer_info_for(tiny_model_cached(arch)) for arch in ARCH_CASES}


def test_sampling_params_combine_tools_with_an_answer_only() -> None:
    assert SamplingParams(tools=TOOLS, json_schema=ANSWER).typed_answer
    assert SamplingParams(tools=TOOLS, json_object=True).typed_answer
    assert not SamplingParams(tools=TOOLS, tool_choice="none", json_schema=ANSWER).typed_answer
    with pytest.raises(ValueError, match="tools combine only with json_schema or json_object"):
        SamplingParams(tools=TOOLS, regex="a+")
    with pytest.raises(ValueError, match="at most one of"):
        SamplingParams(json_schema=ANSWER, json_object=True)
    spec = ConstraintSpec.from_sampling_params(SamplingParams(tools=TOOLS, json_schema=ANSWER), tool_format="hermes")
    assert spec is not None and json.loads(str(spec.payload))["answer"] is True
    assert [name for name, _ in call_schemas_of(spec)] == ["get_weather"]  # the answer is no call
    required = ConstraintSpec.from_sampling_params(
        SamplingParams(tools=TOOLS, tool_choice="required", json_schema=ANSWER), tool_format="hermes")
    assert "answer" not in json.loads(str(required.payload))  # a forced call leaves no room for the answer


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCH_CASES)
def test_walks_end_as_valid_calls_or_a_valid_answer(backend: str, arch: str, tokenizers) -> None:
    tok, info = tokenizers[arch]
    fmt = TOOL_CALL_FORMAT[arch]
    params = SamplingParams(tools=TOOLS, json_schema=ANSWER, parallel_tool_calls=False)
    compiled = get_backend(backend).compile(ConstraintSpec.from_sampling_params(params, tool_format=fmt), info)
    opener_id = info.single_token_id(OPENER[fmt])
    brace = tok.encode("{", add_special_tokens=False)
    answers = calls = 0
    for seed in range(8):
        matcher = compiled.new_matcher()
        first = [opener_id] if seed % 2 else brace  # force each branch in turn
        assert matcher.accept_tokens(first) == len(first)
        walk = random_walk(matcher, random.Random(seed), max_tokens=300, eos_prob=0.5)
        if not walk.finished:
            continue
        text = decode(info, first + walk.tokens)
        parser = ToolCallParser(fmt, TOOLS, bare_calls=False)
        parser.feed(text)
        content, found = parser.finish()
        if seed % 2:
            assert found and not content.strip(), text
            for call in found:
                jsonschema.validate(call.arguments, {**ARGS, "properties": {
                    "city": ARGS["properties"]["city"], "days": {"type": "integer", "enum": [1, 2]}}})
            calls += 1
        else:
            assert not found, text
            jsonschema.validate(json.loads(content), ANSWER)
            answers += 1
    assert answers and calls
