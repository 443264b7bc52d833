"""`not` written as the positive schema it means, where that is the same set of values, for llguidance (which
refuses `not`: "Unimplemented keys").

- `not: {}` or `not: true` (its operand matches every value): the schema matches nothing (`false`). Schemas say
  "never" so (TypeScript's `never`, a branch for values JSON cannot hold); inside an `anyOf` such a branch
  simply drops out.
- `not: false`: no constraint.
- `not` of a schema that only names types (`{"not": {"type": "null"}}`, "any value but null"): the other JSON
  types, intersected with the schema's own `type`. Not done where that would have to say "a number, but not an
  integer" (no `type` says it).
- `not: {"required": [P]}` on a schema of type object: P absent (`"properties": {P: false}`).

Annotations (title, description, ...) in the operand change nothing. Any other `not` is left for the backend
to refuse, naming it (an output must never break its schema).
"""

from __future__ import annotations

from typing import Any, Optional, Union

from agentserve.grammar.schema_utils import map_subschemas

_ANNOTATIONS = frozenset(("title", "description", "$comment", "examples", "default", "deprecated", "readOnly",
                          "writeOnly"))
_JSON_TYPES = ("null", "boolean", "object", "array", "number", "string")


def _type_set(value: Any) -> Optional[set[str]]:
    if isinstance(value, str):
        return {value}
    if isinstance(value, list) and value and all(isinstance(t, str) for t in value):
        return set(value)
    return None


def _other_types(named: set[str]) -> Optional[list[str]]:
    """The JSON types a value of none of `named` has; None when that needs "number but not integer"."""
    if "integer" in named and "number" not in named:
        return None
    return [t for t in _JSON_TYPES if t not in named]  # "number" named covers its integers too


def _within(own: set[str], allowed: list[str]) -> list[str]:
    """`own` types that `allowed` admits (an integer is a number)."""
    return [t for t in sorted(own) if t in allowed or (t == "integer" and "number" in allowed)]


def _positive(rest: dict, operand: dict) -> Union[dict, bool, None]:
    """The schema `rest` AND NOT `operand` without `not`, or None when not rewritten here."""
    keys = set(operand) - _ANNOTATIONS
    if not keys:
        return False
    if keys == {"type"}:
        named = _type_set(operand["type"])
        allowed = _other_types(named) if named is not None else None
        if allowed is None:
            return None
        if "type" in rest:
            own = _type_set(rest["type"])
            if own is None:
                return None
            allowed = _within(own, allowed)
        if not allowed:
            return False
        return {**rest, "type": allowed[0] if len(allowed) == 1 else allowed}
    required = operand.get("required")
    if keys == {"required"} and rest.get("type") == "object" and isinstance(required, list) and len(required) == 1 \
            and isinstance(required[0], str):
        name = required[0]
        if name in (rest.get("required") or []):
            return False
        properties = rest.get("properties")
        if properties is not None and not isinstance(properties, dict):
            return None
        return {**rest, "properties": {**(properties or {}), name: False}}
    return None


def not_as_positive(schema: Any) -> Any:
    def rewrite(node: dict, path: str) -> Any:
        if "not" not in node:
            return node
        operand = node["not"]
        rest = {k: v for k, v in node.items() if k != "not"}
        if operand is False:
            return rest
        if operand is True:
            return False
        if not isinstance(operand, dict):
            return node
        positive = _positive(rest, operand)
        return node if positive is None else positive

    return map_subschemas(schema, rewrite)
