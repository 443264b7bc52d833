"""Objects closed to undeclared keys: a JSON schema object that lists its `properties` and says nothing
about other keys gets `"additionalProperties": false` before it is compiled.

JSON Schema lets such an object carry any other key, and small models use that freedom: SmolLM2 asked
for get_weather(city) writes {"city": "Paris", "description": "..."}, a call no Python tool accepts.
vLLM's default backend (xgrammar, strict mode) closes these objects, so vLLM users expect it; this does
the same for every backend here. A schema that wants other keys says so (`"additionalProperties": true`
or a schema for them).

Closing is only done where it cannot make a valid document invalid other than by an undeclared key:
not where other keywords bring keys of their own (allOf / anyOf / oneOf / $ref beside the properties,
or the object being a branch of a combinator whose other branches or parent declare keys), not where
`required` names a key the properties lack, and not beyond a minProperties the properties cannot meet.
Empty `properties` close too (xgrammar strict: `{}` only): a tool declared without parameters takes none.
"""

from __future__ import annotations

from typing import Any, Iterator

# Keywords that already decide other keys, or that bring keys from elsewhere (so a closed object would
# refuse keys the schema allows).
_DECIDES_OTHER_KEYS = ("additionalProperties", "patternProperties", "unevaluatedProperties")
_BRINGS_KEYS = ("allOf", "anyOf", "oneOf", "$ref", "$dynamicRef", "if", "then", "else", "dependentSchemas",
                "dependencies")
_COMBINATORS = ("allOf", "anyOf", "oneOf")
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
# Maps of schemas that apply to the object itself (when a key is present), so their keys merge with the
# object's own: closing one would refuse the object's other keys (`{"a": 1}` against a closed
# `{"properties": {"c": ...}}` where "a" brings it in). They stay open, as combinator branches do.
_SAME_OBJECT_MAPS = ("dependentSchemas", "dependencies")
# Values, not schemas; and the two keywords whose schemas a closed object would loosen (a document the
# `not` or `if` schema no longer matches would pass where the original refused it): left as given.
_DATA_KEYWORDS = ("enum", "const", "default", "examples", "required", "not", "if")


def close_objects(schema: Any) -> Any:
    """A copy of `schema` with its open objects closed (see the module's rule); other values as given."""
    return _close(schema, False, frozenset(_merged_refs(schema, False)), "#")


def _closable(node: dict) -> bool:
    props = node.get("properties")
    if not isinstance(props, dict):  # `{"type": "object"}` alone means any object (xgrammar strict: too)
        return False
    if any(k in node for k in _DECIDES_OTHER_KEYS) or any(k in node for k in _BRINGS_KEYS):
        return False
    required = node.get("required")
    if isinstance(required, list) and not set(k for k in required if isinstance(k, str)) <= set(props):
        return False
    min_props = node.get("minProperties")
    return not (isinstance(min_props, int) and min_props > len(props))


def _branches_mergeable(node: dict, key: str) -> bool:
    """A combinator's branches are merged with keys declared beside them: allOf's with each other,
    anyOf / oneOf's with this node's own properties. Closing such a branch would refuse those keys."""
    return key == "allOf" or "properties" in node


def _merged_refs(node: Any, mergeable: bool) -> Iterator[str]:
    """The $refs of combinator branches merged with other keys (their definitions must stay open): the same
    walk as _close's, which needs them before it reaches the definitions."""
    if isinstance(node, list):
        for item in node:
            yield from _merged_refs(item, mergeable)
        return
    if not isinstance(node, dict):
        return
    if mergeable and isinstance(node.get("$ref"), str):
        yield node["$ref"]
    for key, value in node.items():
        if key in _COMBINATORS and isinstance(value, list):
            yield from _merged_refs(value, _branches_mergeable(node, key))
        elif key in _SCHEMA_MAPS and isinstance(value, dict):
            for sub in value.values():
                yield from _merged_refs(sub, False)
        elif key in _SAME_OBJECT_MAPS and isinstance(value, dict):
            for sub in value.values():
                yield from _merged_refs(sub, True)
        elif key not in _DATA_KEYWORDS:
            yield from _merged_refs(value, False)


def _close(node: Any, mergeable: bool, merged_refs: frozenset[str], pointer: str) -> Any:
    """`mergeable`: the node's keys may be merged with keys declared elsewhere (a combinator branch, or a
    definition that such a branch references): it stays open."""
    if isinstance(node, list):
        return [_close(item, mergeable, merged_refs, f"{pointer}/{i}") for i, item in enumerate(node)]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        at = f"{pointer}/{key}"
        if key in _COMBINATORS and isinstance(value, list):
            out[key] = _close(value, _branches_mergeable(node, key), merged_refs, at)
        elif key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: _close(sub, f"{at}/{name}" in merged_refs, merged_refs, f"{at}/{name}")
                        for name, sub in value.items()}
        elif key in _SAME_OBJECT_MAPS and isinstance(value, dict):
            out[key] = {name: _close(sub, True, merged_refs, f"{at}/{name}") for name, sub in value.items()}
        elif key in _DATA_KEYWORDS:
            out[key] = value
        else:
            out[key] = _close(value, False, merged_refs, at)
    if not mergeable and _closable(node):
        out["additionalProperties"] = False
    return out
