"""`oneOf` as `anyOf` where that loses nothing a generated value could break.

A grammar cannot count how many branches a value matches, so the backends compile `oneOf` as `anyOf` (xgrammar,
outlines) or refuse it (llguidance). Compiled as `anyOf`, a value matching two branches would be generated and
break the schema. So a `oneOf` is rewritten here only where no value can match two of its branches, or where
the rewritten branches exclude those values. Two branches exclude each other when

- their JSON types are disjoint (integer counts as a number), the types read from `type`, from `enum` /
  `const` values, or from nested `anyOf` / `oneOf` branches that all say;
- both allow finitely many values (`enum`, `const`) and share none;
- they are objects that both require a property whose `const` / `enum` values they do not share (a
  discriminated union: OpenAPI's discriminators, tool schemas' "kind" / "type" fields);

local `$ref`s (`#/definitions/...`, `#/$defs/...`) read through. And branches that only say which properties
are required (`{"required": ["radius"]}` vs `{"required": ["length", "width"]}`, as tool schemas choose
between argument sets) become `anyOf` branch i with the properties the other branches require and it does not
marked absent (`"properties": {"width": false}`): a value generated so matches branch i and no other (each
other branch misses a required property). The values that leaves out (radius together with length alone) are
valid but never needed: generation only has to stay inside the schema. Not done when one branch's set holds
another's (a value with the larger set matches both, whatever is marked absent).

Any other `oneOf` is left for the backend to refuse, naming it (an output must never break its schema).
"""

from __future__ import annotations

from typing import Any, Optional

from agentserve.grammar.schema_utils import json_key, map_subschemas

_JSON_TYPES = {bool: "boolean", int: "number", float: "number", str: "string", type(None): "null", list: "array",
               dict: "object"}


class _Schema:
    """Reads of one schema's subschemas, with its local $refs resolved."""

    def __init__(self, root: Any) -> None:
        self.root = root

    def resolve(self, node: Any, depth: int = 0) -> Any:
        ref = node.get("$ref") if isinstance(node, dict) else None
        if not isinstance(ref, str) or depth > 8:
            return node
        parts = ref.split("/")
        if parts[0] != "#" or len(parts) != 3 or parts[1] not in ("definitions", "$defs"):
            return node
        target = (self.root.get(parts[1]) or {}).get(parts[2]) if isinstance(self.root, dict) else None
        return node if target is None else self.resolve(target, depth + 1)

    def values(self, node: Any) -> Optional[set[str]]:
        """The finitely many values the node allows (JSON texts), or None."""
        node = self.resolve(node)
        if not isinstance(node, dict):
            return None
        if "const" in node:
            return {json_key(node["const"])}
        if isinstance(node.get("enum"), list) and node["enum"]:
            return {json_key(v) for v in node["enum"]}
        for key in ("anyOf", "oneOf"):
            if isinstance(node.get(key), list) and node[key]:
                parts = [self.values(b) for b in node[key]]
                return None if any(p is None for p in parts) else set().union(*parts)  # type: ignore[arg-type]
        return None

    def types(self, node: Any) -> Optional[set[str]]:
        """The JSON types the node allows ("integer" read as "number"), or None when it does not say."""
        node = self.resolve(node)
        if not isinstance(node, dict):
            return None
        t = node.get("type")
        if isinstance(t, (str, list)):
            names = [t] if isinstance(t, str) else t
            return {"number" if n == "integer" else str(n) for n in names}
        if "const" in node or isinstance(node.get("enum"), list):
            values = [node["const"]] if "const" in node else node["enum"]
            return {_JSON_TYPES.get(type(v), "object") for v in values}
        for key in ("anyOf", "oneOf"):
            if isinstance(node.get(key), list) and node[key]:
                parts = [self.types(b) for b in node[key]]
                return None if any(p is None for p in parts) else set().union(*parts)  # type: ignore[arg-type]
        return None

    def _discriminated(self, a: dict, b: dict) -> bool:
        for name in set(a.get("required") or []) & set(b.get("required") or []):
            va = self.values((a.get("properties") or {}).get(name))
            vb = self.values((b.get("properties") or {}).get(name))
            if va is not None and vb is not None and not va & vb:
                return True
        return False

    def exclusive(self, a: Any, b: Any) -> bool:
        """Whether no value can match both branches (a sufficient test, not a complete one)."""
        a, b = self.resolve(a), self.resolve(b)
        ta, tb = self.types(a), self.types(b)
        if ta is not None and tb is not None and not ta & tb:
            return True
        va, vb = self.values(a), self.values(b)
        if va is not None and vb is not None and not va & vb:
            return True
        return isinstance(a, dict) and isinstance(b, dict) and self._discriminated(a, b)


def _required_only(branches: list[Any]) -> Optional[list[list[str]]]:
    """Each branch's required names, when every branch says nothing else (but "type": "object", which tool
    schemas' normalization adds) and no set holds another."""
    sets: list[list[str]] = []
    for b in branches:
        if not isinstance(b, dict) or "required" not in b or set(b) - {"required", "type"} \
                or b.get("type", "object") not in ("object", ["object"]) or not isinstance(b["required"], list) \
                or not b["required"] or not all(isinstance(r, str) for r in b["required"]):
            return None
        sets.append(list(dict.fromkeys(b["required"])))
    for i, a in enumerate(sets):
        for j, b in enumerate(sets):
            if i != j and set(b) <= set(a):
                return None
    return sets


def one_of_as_any_of(schema: Any, required_sets: bool = True) -> Any:
    """The schema with each `oneOf` that can be compiled exactly (module docstring) written as `anyOf`;
    `required_sets=False` rewrites only branches that exclude each other as they are (xgrammar and outlines:
    the required-sets form marks properties absent with `false` schemas, which they are not trusted with)."""
    reader = _Schema(schema)

    def rewrite(node: dict, path: str) -> dict:
        branches = node.get("oneOf")
        if not isinstance(branches, list) or not branches or "anyOf" in node:
            return node
        rest = {k: v for k, v in node.items() if k != "oneOf"}
        if all(reader.exclusive(a, b) for i, a in enumerate(branches) for b in branches[i + 1:]):
            return {**rest, "anyOf": branches}
        sets = _required_only(branches) if required_sets else None
        if sets is None:
            return node
        names = list(dict.fromkeys(n for s in sets for n in s))
        return {**rest, "anyOf": [{**b, "required": s, "properties": {n: False for n in names if n not in s}}
                                  for b, s in zip(branches, sets)]}

    return map_subschemas(schema, rewrite)
