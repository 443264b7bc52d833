"""Walking JSON Schemas: which keys hold subschemas, and rewrites over every subschema."""

from __future__ import annotations

import json
from typing import Any, Callable

from agentserve.grammar.interface import GrammarError

# keyword -> how its value holds subschemas
SCHEMA_MAP_KEYWORDS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
SCHEMA_LIST_KEYWORDS = ("anyOf", "oneOf", "allOf", "prefixItems")
SCHEMA_KEYWORDS = ("additionalProperties", "not", "if", "then", "else", "contains", "propertyNames",
                   "unevaluatedProperties", "unevaluatedItems", "additionalItems")


def map_subschemas(schema: Any, fn: Callable[[dict, str], Any], path: str = "") -> Any:
    """Rewrite a schema bottom-up: `fn(node, path)` is called on every (sub)schema dict after its
    children were rewritten, and returns the replacement (a dict, or true / false). Non-dict schemas
    (true/false) pass."""
    if not isinstance(schema, dict):
        return schema
    out: dict = {}
    for key, value in schema.items():
        sub = f"{path}.{key}" if path else key
        if key in SCHEMA_MAP_KEYWORDS and isinstance(value, dict):
            out[key] = {k: map_subschemas(v, fn, f"{sub}.{k}") for k, v in value.items()}
        elif key in SCHEMA_LIST_KEYWORDS and isinstance(value, list):
            out[key] = [map_subschemas(v, fn, f"{sub}[{i}]") for i, v in enumerate(value)]
        elif key == "items":
            if isinstance(value, list):
                out[key] = [map_subschemas(v, fn, f"{sub}[{i}]") for i, v in enumerate(value)]
            else:
                out[key] = map_subschemas(value, fn, sub)
        elif key in SCHEMA_KEYWORDS:
            out[key] = map_subschemas(value, fn, sub)
        elif key == "dependencies" and isinstance(value, dict):
            out[key] = {k: map_subschemas(v, fn, f"{sub}.{k}") if isinstance(v, dict) else v
                        for k, v in value.items()}
        else:
            out[key] = value
    return fn(out, path)


def strip_formats(schema: Any, supported: frozenset[str]) -> Any:
    """Drop `format` annotations a backend does not implement.

    JSON Schema treats `format` as an annotation unless a validator opts in, so a value
    generated without it is still valid; backends that enforce the formats they know and reject
    the others would otherwise fail the whole schema."""

    def fix(node: dict, path: str) -> dict:
        fmt = node.get("format")
        if isinstance(fmt, str) and fmt not in supported:
            node = {k: v for k, v in node.items() if k != "format"}
        return node

    return map_subschemas(schema, fix)


# Formats some backends get wrong, as regexes (no anchors) whose every match is valid. IPv4: octets up to
# 255 without leading zeros. Date (RFC 3339 full-date): each month's own last day, and February 29th in
# leap years only (divisible by 4: the last two digits; centuries only when divisible by 400).
_OCTET = "(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
IPV4_REGEX = f"({_OCTET}\\.){{3}}{_OCTET}"
# IPv6 (RFC 4291 text form): eight groups, or fewer around one "::"; no zone and no dotted IPv4 tail.
_HEX4 = "[0-9a-fA-F]{1,4}"
IPV6_REGEX = (f"(({_HEX4}:){{7}}{_HEX4}|({_HEX4}:){{1,7}}:|({_HEX4}:){{1,6}}:{_HEX4}|({_HEX4}:){{1,5}}(:{_HEX4}){{1,2}}"
              f"|({_HEX4}:){{1,4}}(:{_HEX4}){{1,3}}|({_HEX4}:){{1,3}}(:{_HEX4}){{1,4}}|({_HEX4}:){{1,2}}(:{_HEX4}){{1,5}}"
              f"|{_HEX4}:(:{_HEX4}){{1,6}}|:((:{_HEX4}){{1,7}}|:))")
# RFC 3339 time with its required UTC offset. No leap second (":60"): RFC 3339 writes one, but Python's
# datetime, pydantic and most other parsers refuse it, so a tool's runner could not read the value.
TIME_REGEX = r"([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]+)?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])"
_MULTIPLE_OF_4 = "(0[48]|[2468][048]|[13579][26])"  # two digits, 00 aside
FULL_DATE_REGEX = ("([0-9]{4}-((0[13578]|1[02])-(0[1-9]|[12][0-9]|3[01])|(0[469]|11)-(0[1-9]|[12][0-9]|30)"
                   f"|02-(0[1-9]|1[0-9]|2[0-8]))|([0-9]{{2}}{_MULTIPLE_OF_4}|({_MULTIPLE_OF_4}|00)00)-02-29)")
DATE_TIME_REGEX = f"{FULL_DATE_REGEX}T{TIME_REGEX}"


# Formats no backend (or not every backend) implements, which validators check: as patterns every match of
# which passes. JSON pointers (RFC 6901) exactly; relative ones with a count below 100 and a pointer or "#"
# after it (jsonschema's checker refuses a bare count, "4072", and a 0 followed by a digit, "105/a");
# idn-hostname as the ASCII labels IDNA 2008
# takes (lowercase: it disallows capitals; no "--", which it reserves at the 3rd and 4th place); idn-email
# as an ASCII email.
_POINTER_TOKEN = "/([^~/]|~[01])*"
_IDN_LABEL = "[a-z0-9]{1,20}(-[a-z0-9]{1,20}){0,2}"
_EMAIL_LABEL = "[a-z0-9]([a-z0-9-]*[a-z0-9])?"
_EMAIL_ATOM = "[a-z0-9!#$%&'*+/=?^_`{|}~-]+"
EMAIL_REGEX = f"{_EMAIL_ATOM}(\\.{_EMAIL_ATOM})*@({_EMAIL_LABEL}\\.)+{_EMAIL_LABEL}"
CHECKED_FORMAT_PATTERNS = {
    "json-pointer": f"^({_POINTER_TOKEN})*$",
    "relative-json-pointer": f"^(0|[1-9][0-9]?)(#|({_POINTER_TOKEN})+)$",
    "idn-hostname": f"^{_IDN_LABEL}(\\.{_IDN_LABEL}){{0,3}}$",
    "idn-email": f"^{EMAIL_REGEX}$",
}


def map_patterns(schema: Any, fn: Callable[[str, str], str]) -> Any:
    """`schema` with each `pattern` and each `patternProperties` key replaced by `fn(regex, path)` (path: the
    node's place, "" for the root), for a backend that must read them otherwise than JSON Schema writes them."""

    def fix(node: dict, path: str) -> dict:
        if isinstance(node.get("pattern"), str):
            node = {**node, "pattern": fn(node["pattern"], path)}
        if isinstance(node.get("patternProperties"), dict):
            node = {**node, "patternProperties": {fn(k, path): v for k, v in node["patternProperties"].items()}}
        return node

    return map_subschemas(schema, fix)


def formats_as_patterns(schema: Any, patterns: dict[str, str]) -> Any:
    """`schema` with each `format` named in `patterns` (on a node without a pattern of its own) replaced
    by that pattern: for a backend whose own regex for the format is wrong."""

    def fix(node: dict, path: str) -> dict:
        fmt = node.get("format")
        if isinstance(fmt, str) and fmt in patterns and "pattern" not in node:
            node = {**{k: v for k, v in node.items() if k != "format"}, "pattern": patterns[fmt]}
        return node

    return map_subschemas(schema, fix)


def _disjoint_types(branches: list) -> bool:
    """oneOf branches that are provably exclusive: each a single distinct JSON type (integer and
    number overlap), or each a distinct const."""
    types = []
    for b in branches:
        if not isinstance(b, dict):
            return False
        t = b.get("type")
        if isinstance(t, str):
            types.append(t)
        else:
            break
    else:
        kinds = ["number" if t == "integer" else t for t in types]
        return len(set(kinds)) == len(kinds)
    consts = [json_key(b["const"]) for b in branches if isinstance(b, dict) and "const" in b]
    return len(consts) == len(branches) and len(set(consts)) == len(consts)


def json_key(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


_SIBLING_CONSTRAINTS = ("properties", "required", "additionalProperties", "patternProperties", "items",
                       "prefixItems", "minItems", "maxItems", "minLength", "maxLength", "pattern", "minimum",
                       "maximum", "exclusiveMinimum", "exclusiveMaximum", "enum", "const", "format")
_OBJECT_KEYWORDS = ("properties", "required", "additionalProperties", "patternProperties",
                    "minProperties", "maxProperties")
_TYPE_OF = {bool: "boolean", int: "integer", float: "number", str: "string", type(None): "null",
            list: "array", dict: "object"}


def _fits(value: Any, types: set[str]) -> bool:
    t = _TYPE_OF.get(type(value), "object")
    return t in types or (t == "integer" and "number" in types)


def check_enforceable(schema: Any, backend: str, unsupported: frozenset[str], *,
                      required_in_properties: bool = True, disjoint_one_of: bool = True,
                      applicator_siblings: bool = True, typed_keywords: bool = True) -> None:
    """Raise GrammarError when the schema uses what `backend` would accept but not enforce.

    Some backends compile keywords they ignore (bounds, uniqueItems, allOf, ...), so outputs can
    break the schema; measured with benchmarks/grammar.py. Rejecting them keeps "compiled" meaning
    "every output validates"."""
    def check(node: dict, path: str) -> dict:
        where = path or "the root"
        for kw in node:  # in schema order: the message names the first one
            if kw in unsupported and not (kw == "uniqueItems" and node[kw] is False):
                raise GrammarError(f"{backend} does not enforce '{kw}' (at {where})")
        if required_in_properties and isinstance(node.get("required"), list):
            declared = node.get("properties")
            props = declared if isinstance(declared, dict) else {}
            missing = [r for r in node["required"] if r not in props]
            if missing:
                raise GrammarError(f"{backend} does not generate required properties missing from "
                                   f"'properties' ({missing[0]!r} at {where})")
        if disjoint_one_of and isinstance(node.get("oneOf"), list) and not _disjoint_types(node["oneOf"]):
            raise GrammarError(f"{backend} compiles 'oneOf' as 'anyOf'; its branches are not provably "
                               f"exclusive (at {where})")
        t = node.get("type")
        types = {t} if isinstance(t, str) else set(t) if isinstance(t, list) else None
        if types is not None:
            values = node.get("enum", []) + ([node["const"]] if "const" in node else [])
            if isinstance(values, list) and any(not _fits(v, types) for v in values):
                raise GrammarError(f"{backend}: enum/const values do not match type {t!r} (at {where})")
            if typed_keywords and "object" not in types and any(k in node for k in _OBJECT_KEYWORDS):
                kw = next(k for k in _OBJECT_KEYWORDS if k in node)
                raise GrammarError(f"{backend} mishandles object keyword '{kw}' on type {t!r} (at {where})")
        if applicator_siblings:
            for app in ("anyOf", "oneOf", "allOf", "$ref"):
                if app in node:
                    sib = next((k for k in _SIBLING_CONSTRAINTS if k in node), None)
                    if sib is not None:
                        raise GrammarError(f"{backend} does not combine '{app}' with the sibling keyword "
                                           f"'{sib}' (at {where})")
        return node

    map_subschemas(schema, check)
