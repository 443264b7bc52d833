"""`dependencies` / `dependentRequired` / `dependentSchemas` written as the `anyOf` they mean, for llguidance
(which refuses them: "Unimplemented keys").

"If property P is present, Q must be too" is "P is absent, or Q is present": `anyOf [{"properties": {P: false}},
{"required": [Q]}]`; with a schema S instead of names, "P is absent, or the object matches S". That is the
same set of values (not an approximation), so nothing generated can break the original schema; where the
object requires P itself, the dependency simply applies. Draft 4-7's
`dependencies` holds both forms; 2019-09 split them into `dependentRequired` and `dependentSchemas`.

Rewritten only where the object has no `anyOf` / `oneOf` / `allOf` of its own, and with one dependency (several
would need `allOf` of the alternatives); anything else is left for the backend to refuse, naming it.
"""

from __future__ import annotations

from typing import Any, Optional

from agentserve.grammar.schema_utils import map_subschemas

DEPENDENCY_KEYWORDS = ("dependencies", "dependentRequired", "dependentSchemas")


# Inside an `anyOf` branch, llguidance reports what it refuses as the branch being unsatisfiable (naming some
# required property instead): a schema alternative that still holds one of these keeps its dependency, so the
# refusal names what is unsupported.
_REFUSED_INSIDE = frozenset(("oneOf", "not", *DEPENDENCY_KEYWORDS))


def _holds_refused(node: Any) -> bool:
    if isinstance(node, dict):
        return any(k in _REFUSED_INSIDE or _holds_refused(v) for k, v in node.items())
    if isinstance(node, list):
        return any(_holds_refused(v) for v in node)
    return False


def _alternative(keyword: str, value: Any) -> Optional[dict]:
    """What the dependency asks for when its property is present, or None (a form not rewritten here)."""
    if isinstance(value, list) and keyword != "dependentSchemas" and all(isinstance(v, str) for v in value):
        return {"required": list(dict.fromkeys(value))}
    if isinstance(value, dict) and keyword != "dependentRequired" and not _holds_refused(value):
        return value
    return None


def dependencies_as_any_of(schema: Any) -> Any:
    def rewrite(node: dict, path: str) -> dict:
        present = [k for k in DEPENDENCY_KEYWORDS if k in node]
        if len(present) != 1 or any(k in node for k in ("anyOf", "oneOf", "allOf")):
            return node
        deps = node[present[0]]
        if not isinstance(deps, dict) or len(deps) != 1:
            return node
        (name, value), = deps.items()
        alternative = _alternative(present[0], value)
        if alternative is None:
            return node
        rest = {k: v for k, v in node.items() if k != present[0]}
        if name in (node.get("required") or []):  # never absent: the dependency always applies
            if list(alternative) == ["required"]:
                return {**rest, "required": list(dict.fromkeys(node["required"] + alternative["required"]))}
            return {**rest, "anyOf": [alternative]}
        return {**rest, "anyOf": [{"properties": {name: False}}, alternative]}

    return map_subschemas(schema, rewrite)
