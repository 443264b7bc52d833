"""Tool parameter schemas: the dialects real tool definitions use, normalised to plain JSON Schema.

Type aliases ("dict", "float", "int", "bool", "list", "str", "string " ...), enums without a type
(inferred), properties without `"type": "object"`, OpenAPI-2 `"required": true` on properties,
OpenAPI-3 `nullable`, `"items": "string"` and `"properties": {"x": "int"}` shorthands, draft-4
tuple `items`. What no backend enforces is rejected with a GrammarError naming its path (parse_tools leaves
those keywords out first: grammar/unenforced_keywords.py); so are `not` and
the dependency keywords except in the forms that have an exact positive one (grammar/not_keyword.py,
grammar/dependent_keywords.py), which go on to the backend (llguidance compiles them; xgrammar and outlines
refuse them, naming them).
"""

from __future__ import annotations

from typing import Any, Optional

from agentserve.grammar.dependent_keywords import DEPENDENCY_KEYWORDS, dependencies_as_any_of
from agentserve.grammar.interface import GrammarError
from agentserve.grammar.not_keyword import not_as_positive

_TYPE_ALIASES = {
    "object": "object", "dict": "object", "map": "object", "hash": "object", "struct": "object",
    "number": "number", "float": "number", "double": "number", "decimal": "number", "real": "number",
    "integer": "integer", "int": "integer", "long": "integer", "int32": "integer", "int64": "integer",
    "boolean": "boolean", "bool": "boolean",
    "array": "array", "list": "array", "tuple": "array", "set": "array",
    "string": "string", "str": "string", "text": "string", "char": "string",
    "null": "null", "none": "null",
}
_ANY_TYPES = ("any", "")

# Keywords that no supported backend enforces: rejected rather than silently dropped.
UNSUPPORTED_KEYWORDS = (
    "$dynamicRef", "$dynamicAnchor", "$recursiveRef", "$recursiveAnchor", "if", "then", "else",
    "unevaluatedProperties", "unevaluatedItems", "contains", "minContains", "maxContains", "propertyNames",
    "uniqueItems",
)

_MAP_KEYWORDS = ("properties", "patternProperties", "$defs", "definitions")
_LIST_KEYWORDS = ("anyOf", "oneOf", "allOf", "prefixItems")
# Dialect keywords folded into other keywords (required, nullable, additionalItems) or dropped
# (optional; uniqueItems: false, the only value that passes the unsupported-keyword check).
_FOLDED_KEYWORDS = ("required", "nullable", "optional", "uniqueItems", "additionalItems")
_APPLICATORS = ("anyOf", "oneOf", "allOf", "$ref")
_OBJECT_HINTS = ("properties", "additionalProperties", "patternProperties")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _one_type(t: Any, path: str) -> Optional[str]:
    """A type name or alias in JSON Schema's spelling; None for "any"."""
    if not isinstance(t, str):
        raise GrammarError(f"unsupported type {t!r} at {path}.type")
    key = t.strip().lower()
    if key in _ANY_TYPES:
        return None
    if key not in _TYPE_ALIASES:
        raise GrammarError(f"unsupported type {t!r} at {path}.type")
    return _TYPE_ALIASES[key]


def _norm_type(value: Any, path: str) -> Any:
    if isinstance(value, list):
        types = [_one_type(t, path) for t in value]
        if any(t is None for t in types):
            return None
        return list(dict.fromkeys(types)) if len(set(types)) > 1 else types[0]
    return _one_type(value, path)


def normalize_tool_schema(schema: Any, path: str = "parameters") -> dict:
    """A tool's parameter schema in plain JSON Schema, or GrammarError naming what is unsupported
    (see the module docstring for the dialects it fixes)."""
    if schema is None or schema == {}:
        return {"type": "object", "properties": {}}
    if not isinstance(schema, dict):
        raise GrammarError(f"tool parameters must be a JSON object schema at {path}, got {type(schema).__name__}")
    out = _normalize(schema, path)
    if not isinstance(out, dict):
        raise GrammarError(f"tool parameters must be an object schema at {path}")
    t = out.get("type")
    if t is None:
        out = {"type": "object", **out}
    elif t != "object" and not (isinstance(t, list) and "object" in t):
        raise GrammarError(f"tool parameters must be an object schema, got type {t!r} at {path}.type")
    elif t != "object":  # ["object", "null"]: a call's arguments are always a JSON object (OpenAI, vLLM)
        out = {**out, "type": "object"}
    return out


def _normalize(node: Any, path: str) -> Any:
    if isinstance(node, bool):
        return node
    if isinstance(node, str):  # shorthand: "int" for {"type": "integer"}
        t = _norm_type(node, path)
        return {"type": t} if t else {}
    if not isinstance(node, dict):
        raise GrammarError(f"expected a schema object at {path}, got {type(node).__name__}")
    _check_supported(node, path)
    required = _required_names(node.get("required"))
    out: dict[str, Any] = {}
    for key, value in node.items():  # in schema order: property order is generation order
        _normalize_keyword(node, key, value, path, out, required)
    _infer_type(out, required)
    _check_enum_types(out, path)
    if required:
        out["required"] = list(dict.fromkeys(required))
    if node.get("nullable") is True:
        _make_nullable(out)
    _check_positive_forms(out, path)
    return out


def _check_positive_forms(node: dict, path: str) -> None:
    """`not` and the dependency keywords only where they are rewritten into an exact positive form."""
    if "not" in node:
        rewritten = not_as_positive(node)
        if isinstance(rewritten, dict) and "not" in rewritten:
            raise GrammarError(f"unsupported keyword 'not' at {path} (compiled only as `not` of {{}}, of types, or of "
                               "one required property of an object)")
    present = [k for k in DEPENDENCY_KEYWORDS if k in node]
    if present and any(k in dependencies_as_any_of(node) for k in present):
        raise GrammarError(f"unsupported keyword '{present[0]}' at {path} (compiled only as one dependency of an "
                           "object without anyOf / oneOf / allOf of its own)")


def _check_supported(node: dict, path: str) -> None:
    for kw in UNSUPPORTED_KEYWORDS:
        if kw in node and not (kw == "uniqueItems" and node[kw] is False):
            raise GrammarError(f"unsupported keyword '{kw}' at {path}")
    ref = node.get("$ref")
    if ref is not None and (not isinstance(ref, str) or not ref.startswith("#")):
        raise GrammarError(f"unsupported keyword '$ref' (only local '#/...' references) at {path}")


def _required_names(required: Any) -> list[str]:
    """`required` as a list of names (a single name is accepted; OpenAPI-2 booleans come later)."""
    if isinstance(required, list):
        return [r for r in required if isinstance(r, str)]
    if isinstance(required, str):
        return [required]
    return []


def _normalize_keyword(node: dict, key: str, value: Any, path: str, out: dict[str, Any],
                       required: list[str]) -> None:
    """Write the normalised form of `node[key]` into `out` (OpenAPI-2 required flags into `required`)."""
    sub = f"{path}.{key}"
    if key in _FOLDED_KEYWORDS:
        return
    if key == "type":
        t = _norm_type(value, path)
        if t is not None:
            out["type"] = t
    elif key in _MAP_KEYWORDS:
        out[key] = _normalize_map(key, value, sub, required)
    elif key in _LIST_KEYWORDS:
        if not isinstance(value, list) or not value:
            raise GrammarError(f"'{key}' must be a non-empty array at {sub}")
        out[key] = [_normalize(v, f"{sub}[{i}]") for i, v in enumerate(value)]
    elif key == "items":
        _normalize_items(node, value, path, out)
    elif key == "additionalProperties":
        out[key] = _normalize(value, sub)
    elif key == "not" and isinstance(value, dict) and "type" in value:  # type aliases only: the rest as given
        t = _norm_type(value["type"], f"{sub}.type")
        out[key] = {**{k: v for k, v in value.items() if k != "type"}, **({"type": t} if t is not None else {})}
    elif key in ("dependentSchemas", "dependencies") and isinstance(value, dict):  # a list value: names, as given
        out[key] = {name: _normalize(dep, f"{sub}.{name}") if isinstance(dep, dict) else dep
                    for name, dep in value.items()}
    elif key == "enum":
        if not isinstance(value, list) or not value:
            raise GrammarError(f"'enum' must be a non-empty array at {sub}")
        out[key] = list(value)
    else:
        out[key] = value


def _normalize_map(key: str, value: Any, sub: str, required: list[str]) -> dict[str, Any]:
    """properties / patternProperties / $defs / definitions: each named subschema normalised."""
    if not isinstance(value, dict):
        raise GrammarError(f"'{key}' must be an object at {sub}")
    mapped = {}
    for name, prop in value.items():
        if key == "properties" and isinstance(prop, dict) and isinstance(prop.get("required"), bool):
            # OpenAPI 2: `"required": true` on the property instead of the parent's list
            if prop["required"] and name not in required:
                required.append(name)
            prop = {k: v for k, v in prop.items() if k != "required"}
        mapped[name] = _normalize(prop, f"{sub}.{name}")
    return mapped


def _normalize_items(node: dict, value: Any, path: str, out: dict[str, Any]) -> None:
    sub = f"{path}.items"
    if not isinstance(value, list):
        out["items"] = _normalize(value, sub)
        return
    # draft-4 tuple form: items [...] + additionalItems -> prefixItems [...] + items
    # (additionalItems without tuple items is ignored, as JSON Schema does)
    out["prefixItems"] = [_normalize(v, f"{sub}[{i}]") for i, v in enumerate(value)]
    extra = node.get("additionalItems", True)
    if extra is not True:
        out["items"] = _normalize(extra, f"{path}.additionalItems")


def _infer_type(out: dict[str, Any], required: list[str]) -> None:
    """A missing `type`, from the enum/const values or the keywords present."""
    if "type" in out:
        return
    if "enum" in out or "const" in out:
        values = out.get("enum", [out.get("const")])
        types = list(dict.fromkeys(_json_type(v) for v in values))
        if set(types) == {"integer", "number"}:
            types = ["number"]
        if not any(k in out for k in _APPLICATORS):
            out["type"] = types[0] if len(types) == 1 else types
    elif any(k in out for k in _OBJECT_HINTS) or required:
        out["type"] = "object"
    elif "items" in out or "prefixItems" in out:
        out["type"] = "array"


def _coerced(value: Any, types: set[str]) -> Any:
    """`value` as one of `types` when the conversion loses nothing (the string "1" as the integer 1,
    "true" as true, 2 as "2"); `value` itself when it already fits or no lossless conversion exists."""
    if _json_type(value) in types:
        return value
    if isinstance(value, str):
        text = value.strip()
        if "integer" in types and text.lstrip("-").isdigit() and str(int(text)) == text:
            return int(text)
        if "number" in types:
            try:
                number = float(text)
            except ValueError:
                number = None
            if number is not None and repr(number) == text:
                return number
        if "boolean" in types and text in ("true", "false"):
            return text == "true"
    elif isinstance(value, float) and "integer" in types and value.is_integer():
        return int(value)
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and "string" in types:
        return str(value)
    return value


def _check_enum_types(out: dict[str, Any], path: str) -> None:
    """Enum values must fit the (possibly aliased) type; values that convert to it losslessly are
    converted (real tool sets declare `"type": "integer", "enum": ["1", "2"]`)."""
    if "type" not in out or "enum" not in out:
        return
    t = out["type"]
    types = set(t) if isinstance(t, list) else {t}
    if "number" in types:
        types.add("integer")
    values = [_coerced(v, types) for v in out["enum"]]
    for v in values:
        if _json_type(v) not in types:
            raise GrammarError(f"enum value {v!r} does not match type {t!r} at {path}.enum")
    out["enum"] = values


def _make_nullable(out: dict[str, Any]) -> None:
    """OpenAPI 3 `nullable: true`: null joins the enum and the type."""
    if "enum" in out and None not in out["enum"]:
        out["enum"] = out["enum"] + [None]
    t = out.get("type")
    if t is not None:
        types = t if isinstance(t, list) else [t]
        if "null" not in types:
            out["type"] = types + ["null"]
