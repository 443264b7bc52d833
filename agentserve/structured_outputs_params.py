"""vLLM's offline forms of an output constraint, so that vLLM code runs here unchanged:

    SamplingParams(structured_outputs=StructuredOutputsParams(json=schema))   # vLLM >= 0.11
    SamplingParams(guided_decoding=GuidedDecodingParams(choice=["yes", "no"]))  # vLLM 0.6 - 0.10

Each is read onto SamplingParams' own constraint fields (json_schema, json_object, regex, choice,
grammar, structural_tag), which the grammar backends compile as for the HTTP API. A `backend` may name the engine's own
backend and no other (vLLM V1's rule; the engine checks it: engine/validation.py). What vLLM's objects can
ask for and agentserve cannot do is an error naming the field: a whitespace pattern.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Optional, Union

from pydantic import BaseModel

# The fields that ask for what agentserve does not do -> why (each refused when set).
_REFUSED = {
    "whitespace_pattern": "a custom whitespace pattern for JSON is not supported",
}


@dataclass
class StructuredOutputsParams:
    """One constraint: a JSON schema (a dict, its JSON text, or a pydantic model class), any JSON object,
    a regex, a list of choices, a context-free grammar, or a structural tag (its JSON text, as vLLM takes it)."""

    json: Union[None, str, dict[str, Any], type[BaseModel]] = None
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    grammar: Optional[str] = None
    json_object: Optional[bool] = None
    # vLLM's options of the compile, accepted at their defaults; what they change agentserve always does or never does.
    disable_fallback: bool = False
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    backend: Optional[str] = None
    whitespace_pattern: Optional[str] = None
    structural_tag: Union[None, str, dict[str, Any]] = None

    def sampling_fields(self, keyword: str) -> dict[str, Any]:
        """SamplingParams' constraint fields for this object, given as SamplingParams(`keyword`=...)."""
        for name, why in _REFUSED.items():
            if getattr(self, name) is not None:
                raise ValueError(f"{keyword}.{name} is not supported: {why}")
        if self.disable_any_whitespace or self.disable_additional_properties:
            raise ValueError(f"{keyword}: disable_any_whitespace and disable_additional_properties are not supported "
                             "(JSON is compiled as the schema says: any whitespace, additionalProperties as given)")
        given = {f.name: getattr(self, f.name) for f in fields(self)
                 if f.name in ("json", "regex", "choice", "grammar", "json_object", "structural_tag")
                 and getattr(self, f.name) not in (None, False)}
        if len(given) != 1:
            raise ValueError(f"{keyword} must give exactly one of json, regex, choice, grammar, json_object and "
                             "structural_tag "
                             f"(got {', '.join(given) or 'none'})")
        (name, value), = given.items()
        backend = {} if self.backend is None else {"structured_outputs_backend": self.backend}
        if name == "json":
            if isinstance(value, type) and issubclass(value, BaseModel):
                value = value.model_json_schema()
            return {"json_schema": value, **backend}
        return {name: value, **backend}


# vLLM's name for the same object before 0.11.
GuidedDecodingParams = StructuredOutputsParams
