"""vLLM's request-level output constraints read one way for every endpoint: `structured_outputs`' fields
(chat and completions, beside the guided_* fields, and the Responses API) and a JSON schema given as text."""

from __future__ import annotations

import json
from typing import Any, Optional

from agentserve.adapters.openai.protocol import OpenAIError, StructuredOutputs
from agentserve.grammar.interface import GrammarError
from agentserve.grammar.structural_tag import structural_tag_payload
from agentserve.grammar.unenforced_keywords import best_effort


def parsed_schema(schema: Any, field: str) -> Any:
    """A JSON schema given as JSON text (guided_json's and structured_outputs.json's string form) parsed."""
    if not isinstance(schema, str):
        return schema
    try:
        return json.loads(schema)
    except json.JSONDecodeError as e:
        raise OpenAIError(400, f"{field} is not valid JSON: {e}", param=field) from None


def structured_outputs_fields(so: Optional[StructuredOutputs]) -> list[tuple[str, str, Any]]:
    """vLLM's `structured_outputs` as (SamplingParams key, request field, value) for each of its constraint
    fields, set or not (chat, completions and the Responses API read it the same way); [] without it."""
    if so is None:
        return []
    return [("json_schema", "structured_outputs.json", so.json_schema), ("regex", "structured_outputs.regex", so.regex),
            ("choice", "structured_outputs.choice", so.choice), ("grammar", "structured_outputs.grammar", so.grammar),
            ("json_object", "structured_outputs.json_object", so.json_object),
            ("structural_tag", "structured_outputs.structural_tag", so.structural_tag)]


def checked_structural_tag(tag: Any, field: str) -> Any:
    """A structural tag checked at the edge, so that a bad one is a 400 naming `field` and where in it the
    problem is (the engine builds its grammar again from the same value)."""
    try:
        structural_tag_payload(tag, field)
    except GrammarError as e:
        raise OpenAIError(400, str(e), param=field) from None
    return tag


def request_constraint_fields(req: Any) -> list[tuple[str, str, Any]]:
    """vLLM's request-level constraint fields of a chat or completions request (guided_*, structural_tag, then
    structured_outputs'), as (SamplingParams key, request field, value), set or not."""
    return [("json_schema", "guided_json", req.guided_json), ("regex", "guided_regex", req.guided_regex),
            ("choice", "guided_choice", req.guided_choice), ("grammar", "guided_grammar", req.guided_grammar),
            ("structural_tag", "structural_tag", req.structural_tag), *structured_outputs_fields(req.structured_outputs)]


def constraint_documents(req: Any) -> list[tuple[str, Any]]:
    """(field, JSON document) for each JSON schema or structural tag a chat or completions request gives,
    for the edge's size and depth limits."""
    rf = req.response_format
    found = [("guided_json", req.guided_json), ("structural_tag", req.structural_tag)]
    if rf is not None and rf.json_schema is not None:
        found.append(("response_format.json_schema.schema", rf.json_schema.json_schema))
    if rf is not None and rf.type == "structural_tag":
        found.append(("response_format", rf.structural_tag()))
    found += [(name, value) for key, name, value in structured_outputs_fields(req.structured_outputs)
              if key in ("json_schema", "structural_tag")]
    return [(field, value) for field, value in found if value is not None]


def constraint_kwargs(req: Any) -> dict[str, Any]:
    """A chat or completions request's output constraint as SamplingParams keywords, from whichever field gave
    it (response_format, guided_*, structured_outputs.*, structural_tag); more than one is a 400."""
    kw: dict[str, Any] = {}
    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        kw["json_object"] = True
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None:
            raise OpenAIError(400, "response_format.json_schema is required when type is 'json_schema'",
                              param="response_format.json_schema")
        schema = rf.json_schema.json_schema
        if schema is None:
            kw["json_object"] = True
        else:  # OpenAI guarantees a schema only under strict: what no backend enforces is refused only then
            kw["json_schema"] = schema if rf.json_schema.strict else best_effort(schema, "response_format")
    elif rf is not None and rf.type == "structural_tag":
        kw["structural_tag"] = checked_structural_tag(rf.structural_tag(), "response_format")
    given = ["response_format"] if rf is not None and rf.type != "text" else []
    fields: dict[str, list[tuple[str, Any]]] = {
        key: [] for key in ("json_schema", "regex", "choice", "grammar", "json_object", "structural_tag")}
    for key, name, value in request_constraint_fields(req):
        fields[key].append((name, value))
    for key, sources in fields.items():
        for name, value in sources:
            if value is None or value is False:
                continue
            given.append(name)
            kw[key] = parsed_schema(value, name) if key == "json_schema" else \
                checked_structural_tag(value, name) if key == "structural_tag" else value
    if len(given) > 1:
        raise OpenAIError(400, f"give at most one output constraint; got {', '.join(given)}", param=given[1])
    return kw
