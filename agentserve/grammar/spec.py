"""ConstraintSpec: what a request's output must match, the key of the compile cache.

    spec = ConstraintSpec.from_sampling_params(params, tool_format=fmt)   # None: unconstrained

Tool-call constraints are built by `tool_constraint.py` (tool definitions -> grammar payload);
this module wraps its payload, so that every spec is made here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

from agentserve.grammar.closed_objects import close_objects
from agentserve.grammar.draft4_bounds import numeric_exclusive_bounds
from agentserve.grammar.interface import GrammarError, canonical_json
from agentserve.grammar.structural_tag import structural_tag_payload
from agentserve.grammar.tool_constraint import tool_call_payload
from agentserve.grammar.unenforced_keywords import exact_forms

if TYPE_CHECKING:  # pragma: no cover
    from agentserve.sampling_params import SamplingParams

CONSTRAINT_KINDS = ("json_schema", "json_object", "regex", "choice", "grammar", "tool_calls", "structural_tag")


@dataclass(frozen=True)
class ConstraintSpec:
    """What a request's output must match. Frozen and hashable: the compile-cache key.

    kind: "json_schema" (payload: canonical JSON of the schema), "json_object" (payload ""),
    "regex" (payload: the pattern), "choice" (payload: tuple of strings), "grammar" (payload: a
    context-free grammar's text, GBNF / EBNF or Lark, as the backend reads it), "tool_calls" (payload:
    canonical JSON of a tool-call structure built by `build_tool_constraint` below), "structural_tag"
    (payload: canonical JSON of the structure a structural tag describes, structural_tag.py).
    """

    kind: str
    payload: Union[str, tuple[str, ...]]

    def __post_init__(self) -> None:
        if self.kind not in CONSTRAINT_KINDS:
            raise GrammarError(f"unknown constraint kind {self.kind!r}; expected one of {CONSTRAINT_KINDS}")
        if self.kind == "choice":
            if not isinstance(self.payload, tuple) or not self.payload:
                raise GrammarError("choice needs a non-empty tuple of strings")
        elif not isinstance(self.payload, str):
            raise GrammarError(f"{self.kind} payload must be a string")

    # -- constructors -------------------------------------------------------------------------
    @classmethod
    def json_schema(cls, schema: Union[str, dict, bool]) -> "ConstraintSpec":
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise GrammarError(f"json_schema is not valid JSON: {e}") from None
        if schema is True:
            schema = {}
        if not isinstance(schema, dict):
            raise GrammarError(f"json_schema must be a JSON object, got {type(schema).__name__}")
        schema = exact_forms(numeric_exclusive_bounds(schema))  # what is left is refused by the compile
        try:
            return cls("json_schema", canonical_json(close_objects(schema)))
        except (TypeError, ValueError) as e:
            raise GrammarError(f"json_schema is not JSON-serializable: {e}") from None

    @classmethod
    def json_object(cls) -> "ConstraintSpec":
        return cls("json_object", "")

    @classmethod
    def regex(cls, pattern: str) -> "ConstraintSpec":
        if not isinstance(pattern, str) or not pattern:
            raise GrammarError("regex must be a non-empty string")
        return cls("regex", pattern)

    @classmethod
    def grammar(cls, text: str) -> "ConstraintSpec":
        if not isinstance(text, str) or not text.strip():
            raise GrammarError("grammar must be a non-empty string")
        return cls("grammar", text)

    @classmethod
    def structural_tag(cls, tag: Union[str, dict], where: str = "structural_tag") -> "ConstraintSpec":
        return cls("structural_tag", structural_tag_payload(tag, where))

    @classmethod
    def choice(cls, choices: Sequence[str]) -> "ConstraintSpec":
        choices = tuple(choices)
        if not choices or not all(isinstance(c, str) for c in choices):
            raise GrammarError("choice must be a non-empty list of strings")
        return cls("choice", choices)

    @classmethod
    def from_sampling_params(cls, params: "SamplingParams", tool_format: Optional[str] = None
                             ) -> Optional["ConstraintSpec"]:
        """The request's constraint, or None when its output is unconstrained.

        `tool_format` (one of tool_formats.TOOL_FORMATS, see `tool_formats.detect_tool_format`) is
        needed when the request has tools (and tool_choice is not "none")."""
        if params.tools and params.tool_choice != "none":
            if tool_format is None:
                raise GrammarError("request has tools but the model's tool-call format is unknown "
                                   "(pass tool_format, see grammar.tool_formats.detect_tool_format)")
            return build_tool_constraint(params.tools, params.tool_choice or "auto", tool_format,
                                         parallel=params.parallel_tool_calls, answer_schema=_answer_schema(params))
        if params.json_schema is not None:
            return cls.json_schema(params.json_schema)
        if params.json_object:
            return cls.json_object()
        if params.regex is not None:
            return cls.regex(params.regex)
        if params.choice is not None:
            return cls.choice(params.choice)
        if params.grammar is not None:
            return cls.grammar(params.grammar)
        if params.structural_tag is not None:
            return cls.structural_tag(params.structural_tag)
        return None


def _answer_schema(params: "SamplingParams") -> Optional[dict]:
    """The typed final answer beside tools: the json_schema, {"type": "object"} for json_object."""
    if params.json_schema is not None:
        schema = ConstraintSpec.json_schema(params.json_schema).payload
        return json.loads(str(schema))
    return {"type": "object"} if params.json_object else None


def build_tool_constraint(tools: Sequence[Any], tool_choice: Any, fmt: str, parallel: bool = True,
                          answer_schema: Optional[dict] = None) -> Optional[ConstraintSpec]:
    """The constraint for a request with tools, or None (tool_choice "none" or no tools). With
    `answer_schema` (tool_choice "auto"), the output is tool calls or a final answer matching it."""
    payload = tool_call_payload(tools, tool_choice, fmt, parallel, answer_schema)
    return None if payload is None else ConstraintSpec("tool_calls", payload)
