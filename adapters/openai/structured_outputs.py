"""vLLM's request-level output constraints read one way for every endpoint: `structured_outputs`' fields
(chat and completions, beside the guided_* fields, and the Responses API) and a JSON schema given as text."""

from __future__ import annotations

import json
from typing import Any, Optional

from agentserve.adapters.openai.protocol import OpenAIError, StructuredOutputs


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
            ("json_object", "structured_outputs.json_object", so.json_object)]
