"""Draft-4 exclusive bounds (`"maximum": 5, "exclusiveMaximum": true`) in the draft-6+ form every backend reads.

Draft 4 made `exclusiveMaximum` / `exclusiveMinimum` booleans that turn `maximum` / `minimum` exclusive;
draft 6 made them the exclusive bound itself (`"exclusiveMaximum": 5`). xgrammar reads only the numeric
form and failed the schema with "Value must be a number", naming no keyword; outlines-core likewise.
A schema that declares draft 4 is rewritten to the numeric form, which means the same. A boolean in a
schema that does not declare draft 4 is refused: under its own draft (2020-12 when `$schema` is absent)
the schema is invalid, and `jsonschema` compares values against `true` as the number 1, so no output
could be checked by the client the way the backend generated it.
"""

from __future__ import annotations

from typing import Any

from agentserve.grammar.interface import GrammarError
from agentserve.grammar.schema_utils import map_subschemas

# "$schema" URIs of the drafts whose exclusive bounds are booleans (draft 3 had the same form).
_BOOLEAN_BOUND_DRAFTS = ("json-schema.org/draft-04/schema", "json-schema.org/draft-03/schema")
_BOUNDS = (("exclusiveMaximum", "maximum"), ("exclusiveMinimum", "minimum"))


def _declares_boolean_bounds(schema: dict) -> bool:
    uri = schema.get("$schema")
    return isinstance(uri, str) and any(d in uri for d in _BOOLEAN_BOUND_DRAFTS)


def numeric_exclusive_bounds(schema: Any, root: str = "") -> Any:
    """`schema` with each draft-4 boolean exclusive bound in the numeric form (see the module); GrammarError
    naming the keyword, its place (under `root`, the schema's own place in the request) and what to write
    when the schema does not declare draft 4."""
    if not isinstance(schema, dict):
        return schema
    draft4 = _declares_boolean_bounds(schema)

    def fix(node: dict, path: str) -> dict:
        where = ".".join(p for p in (root, path) if p) or "the root"
        for exclusive, inclusive in _BOUNDS:
            flag = node.get(exclusive)
            if not isinstance(flag, bool):
                continue
            if not draft4:
                raise GrammarError(
                    f"'{exclusive}' (at {where}) is a boolean, the draft-4 form, but the schema does not declare "
                    f"draft 4: write the bound itself, '\"{exclusive}\": <number>' instead of '\"{inclusive}\": "
                    f"<number>, \"{exclusive}\": true' (draft 6 and later), or declare '\"$schema\": "
                    "\"http://json-schema.org/draft-04/schema#\"'")
            if flag and not isinstance(node.get(inclusive), (int, float)):
                raise GrammarError(f"'{exclusive}': true (at {where}) needs a numeric '{inclusive}' beside it "
                                   "(draft 4)")
            node = {k: v for k, v in node.items() if k != exclusive}
            if flag:
                node[exclusive] = node.pop(inclusive)
        return node

    return map_subschemas(schema, fix)
