"""Keywords no grammar backend enforces (grammar/unenforced_keywords.py). pydantic writes some of them for
ordinary types (`set[str]`: uniqueItems; `dict[Literal[...], V]` / `dict[SomeEnum, V]`: propertyNames),
OpenAPI generators write the no-op `"uniqueItems": false`, and every backend refused all of them: a
response format or a tool with such a parameter was a 400 (llguidance: "Unimplemented keys"). Where an
exact positive form exists it is compiled, and outputs validate against the schema as the client wrote
it. What is left: a tool's calls and a response format without `strict: true` are constrained without it
(a 400 ended the agent's loop; OpenAI enforces neither); a strict response format and vLLM's guided_json
are refused naming its place."""

from __future__ import annotations

import json
import logging
import random
import re
from enum import Enum
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, TypeAdapter

from agentserve.grammar.compiler import GrammarCompiler
from agentserve.grammar.interface import GrammarError
from agentserve.grammar.registry import get_backend
from agentserve.grammar.spec import ConstraintSpec, build_tool_constraint
from agentserve.grammar.unenforced_keywords import exact_forms, unenforced, without_unenforced
from agentserve.testing.tiny import tiny_model_cached
from helpers.grammar_walks import available_backends, decode, random_walk, tokenizer_info_for
from helpers.live_server import live_openai


class Color(Enum):
    RED = "red"
    BLUE = "blue"


class Counts(BaseModel):
    by_axis: dict[Literal["x", "y"], int]
    by_color: dict[Color, int]
    only: set[Literal["on"]]


class Tagging(BaseModel):
    item: str
    tags: set[str]


EXACT = {
    "pydantic_dicts_and_a_one_value_set": TypeAdapter(Counts).json_schema(),
    "unique_items_false": {"type": "array", "items": {"type": "integer"}, "uniqueItems": False, "maxItems": 3},
    "contains_anything": {"type": "array", "items": {"type": "boolean"}, "contains": {}, "minContains": 2,
                          "maxContains": 3},
    "unevaluated_properties": {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
                               "unevaluatedProperties": False},
    "unevaluated_items": {"type": "array", "prefixItems": [{"type": "integer"}], "unevaluatedItems": False},
    "key_pattern": {"type": "object", "propertyNames": {"pattern": "^[a-c]{1,2}$"},
                    "additionalProperties": {"type": "integer"}, "maxProperties": 3},
    "no_keys": {"type": "object", "propertyNames": False},
    "then_without_if": {"type": "object", "properties": {"a": {"type": "integer"}}, "then": {"required": ["a"]}},
}


@pytest.fixture(scope="module")
def info():
    return tokenizer_info_for(tiny_model_cached("qwen2"))[1]


def _finished_outputs(compiled, info, seeds: int, max_tokens: int = 120) -> list[str]:
    walks = [random_walk(compiled.new_matcher(), random.Random(seed), max_tokens=max_tokens) for seed in range(seeds)]
    return [decode(info, w.tokens) for w in walks if w.finished]


@pytest.mark.parametrize("name", sorted(EXACT))
def test_exact_forms_leave_nothing_unenforced(name: str) -> None:
    rewritten = exact_forms(EXACT[name])
    assert unenforced(rewritten) == [], rewritten
    jsonschema.Draft202012Validator.check_schema(rewritten)


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("name", sorted(EXACT))
def test_exact_forms_compile_and_every_output_validates_against_the_original(backend: str, name: str, info) -> None:
    schema = EXACT[name]
    compiler = GrammarCompiler(get_backend(backend), info, timeout_s=30.0)
    try:
        compiled = compiler.compile(ConstraintSpec.json_schema(schema))
    except GrammarError:
        if backend == "llguidance":  # the default backend compiles every exact form
            raise
        pytest.skip(f"{backend} refuses a keyword of the rewritten form, naming it")
    outputs = _finished_outputs(compiled, info, seeds=8)
    assert outputs
    for text in outputs:
        jsonschema.Draft202012Validator(schema).validate(json.loads(text))


def test_the_key_names_become_the_properties() -> None:
    rewritten = exact_forms(TypeAdapter(Counts).json_schema())["properties"]
    assert rewritten["by_axis"]["properties"] == {"x": {"type": "integer"}, "y": {"type": "integer"}}
    assert rewritten["by_color"]["properties"] == {"red": {"type": "integer"}, "blue": {"type": "integer"}}
    assert rewritten["by_axis"]["additionalProperties"] is False
    assert rewritten["only"]["maxItems"] == 1 and "uniqueItems" not in rewritten["only"]


@pytest.mark.parametrize("schema,left", [
    ({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, ("uniqueItems", "")),
    # a declared key matching the pattern would be held to additionalProperties' schema too
    ({"type": "object", "properties": {"ab": {"type": "string"}}, "additionalProperties": {"type": "integer"},
      "propertyNames": {"pattern": "^a"}}, ("propertyNames", "")),
    # patternProperties beside a list of names: which schema a name takes needs the patterns' matching
    ({"type": "object", "patternProperties": {"^x": {"type": "integer"}}, "propertyNames": {"enum": ["xa"]}},
     ("propertyNames", "")),
    ({"type": "object", "properties": {"a": {"if": {"type": "string"}, "then": {"minLength": 2}}}}, ("if", "properties.a")),
    ({"type": "array", "contains": {"type": "integer"}}, ("contains", "")),
    ({"type": "object", "allOf": [{"properties": {"a": {}}}], "unevaluatedProperties": False},
     ("unevaluatedProperties", "")),
])
def test_what_has_no_exact_form_is_left_for_the_caller(schema: dict, left: tuple[str, str]) -> None:
    rewritten = exact_forms(schema)
    assert left in unenforced(rewritten)
    assert unenforced(without_unenforced(rewritten)) == []


@pytest.mark.parametrize("backend", available_backends())
def test_a_schema_with_a_keyword_left_is_refused_naming_it(backend: str, info) -> None:
    compiler = GrammarCompiler(get_backend(backend), info, timeout_s=30.0)
    with pytest.raises(GrammarError, match=r"unsupported keyword 'uniqueItems' at properties\.tags: no grammar backend "
                                           r"enforces it"):
        compiler.compile(ConstraintSpec.json_schema(TypeAdapter(Tagging).json_schema()))
    with pytest.raises(GrammarError, match=r"unsupported keyword '\$ref' at properties\.x"):
        compiler.compile(ConstraintSpec.json_schema({"type": "object", "properties": {
            "x": {"$ref": "https://example.com/x.json"}}}))


@pytest.mark.parametrize("tool_choice", ["required", "auto"])
def test_a_tool_with_a_set_parameter_is_served_and_logged_once(tool_choice: str, info,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    params = TypeAdapter(Tagging).json_schema()
    tools = [{"type": "function", "function": {"name": f"tag_{tool_choice}", "parameters": params}}]
    with caplog.at_level(logging.WARNING, logger="agentserve.grammar.unenforced_keywords"):
        spec = build_tool_constraint(tools, tool_choice, "hermes", parallel=False)
        build_tool_constraint(tools, tool_choice, "hermes", parallel=False)
    notes = [r.getMessage() for r in caplog.records if f"tool 'tag_{tool_choice}'" in r.getMessage()]
    assert len(notes) == 1 and "uniqueItems at properties.tags" in notes[0], notes
    if tool_choice == "auto":
        return  # the same call grammar, behind free text: compiled and walked for "required"
    compiled = GrammarCompiler(get_backend("llguidance"), info, timeout_s=30.0).compile(spec)
    checked = 0
    for text in _finished_outputs(compiled, info, seeds=8, max_tokens=200):
        body = re.search(r"<tool_call>\s*(.*?)\s*</tool_call>", text, re.S)
        assert body is not None, text
        arguments = json.loads(body.group(1))["arguments"]
        jsonschema.validate(arguments, without_unenforced(params))
        Tagging.model_validate(arguments)  # what a pydantic-typed tool runner does with them
        checked += 1
    assert checked


def test_a_response_format_is_refused_only_under_strict() -> None:
    schema = TypeAdapter(Tagging).json_schema()
    with live_openai("qwen2", max_model_len=512) as client:
        model = client.models.list().data[0].id
        messages = [{"role": "user", "content": "tag it"}]
        for strict in (None, False):  # OpenAI does not enforce such a format at all
            spec = {"name": "tagging", "schema": schema, **({} if strict is None else {"strict": strict})}
            reply = client.chat.completions.create(model=model, messages=messages, max_tokens=200, temperature=0,
                                                   response_format={"type": "json_schema", "json_schema": spec})
            if reply.choices[0].finish_reason == "stop":
                Tagging.model_validate_json(reply.choices[0].message.content)
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model=model, messages=messages, max_tokens=8, response_format={
                "type": "json_schema", "json_schema": {"name": "tagging", "schema": schema, "strict": True}})
        assert "unsupported keyword 'uniqueItems' at properties.tags" in refused.value.message
        assert refused.value.body["param"] == "response_format.json_schema.schema"
        answer = client.responses.create(model=model, input="tag it", max_output_tokens=200, temperature=0, text={
            "format": {"type": "json_schema", "name": "tagging", "schema": schema}})
        assert answer.status in ("completed", "incomplete")
        with pytest.raises(openai.BadRequestError, match="uniqueItems"):
            client.responses.create(model=model, input="tag it", max_output_tokens=8, text={
                "format": {"type": "json_schema", "name": "tagging", "schema": schema, "strict": True}})
        body = json.dumps({"model": model, "messages": messages, "max_tokens": 8, "response_format": {
            "type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "number", "default": float("nan")}}}})
        nan_refused = httpx.post(f"{client.base_url}chat/completions", content=body,
                                 headers={"content-type": "application/json"})  # refused by SamplingParams
        assert nan_refused.status_code == 400 and nan_refused.json()["error"]["param"] == \
            "response_format.json_schema.schema", nan_refused.text
        with pytest.raises(openai.BadRequestError, match="uniqueItems"):  # vLLM's field asks for the constraint
            client.chat.completions.create(model=model, messages=messages, max_tokens=8,
                                           extra_body={"structured_outputs": {"json": schema}})
