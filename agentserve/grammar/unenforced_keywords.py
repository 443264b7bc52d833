"""The JSON Schema keywords no grammar backend enforces (uniqueItems, contains, if / then / else,
propertyNames, unevaluatedProperties / unevaluatedItems, dynamic references, references to other
documents), in a schema about to be compiled.

`exact_forms` rewrites those that have an exact positive form, so that every backend compiles them and
every output still validates. Generated schemas write them so: pydantic's `set[str]` is
`"uniqueItems": true`, its `dict[Literal["a", "b"], V]` and `dict[SomeEnum, V]` name the keys in
`propertyNames`, OpenAPI generators write the no-op `"uniqueItems": false`.
- A no-op: `uniqueItems: false`, `propertyNames` / `unevaluated*` / `contains` of `{}` or `true` with
  nothing counted, `then` / `else` without `if`, `if` without either, `minContains` / `maxContains` without
  `contains`, anchors nothing refers to dynamically: left out.
- `propertyNames` that lists the names (`enum` / `const`, directly or through a local `$ref`): the object's
  `properties` become exactly those names (a name without its own schema takes additionalProperties'), and
  other keys are refused. `propertyNames: false`: the object is empty.
- `propertyNames` with a `pattern`, where the pattern schema cannot disagree with declared properties:
  `patternProperties` {pattern: additionalProperties' schema}, other keys refused.
- `uniqueItems: true` on arrays that cannot repeat anyway (at most one item) or whose items all equal one
  value (then at most one item).
- `unevaluatedProperties` / `unevaluatedItems` with no applicator beside them: additionalProperties /
  items (or nothing, where those already decide every key / item).
- `contains` of any value: a minimum (and maximum) item count.

`unenforced` lists what is left. `best_effort` leaves it out of the grammar, for constraints whose client asked
for no guarantee: a tool's parameters (a tool's runner validates its arguments, and a 400 would end an agent's
loop over a keyword vLLM never looks at: it leaves tool_choice "auto" unconstrained) and a response format
without `strict: true` (OpenAI enforces neither). The output can then break only the keyword left out (a
repeated element of a pydantic set, which pydantic takes back as the set). Everywhere else (strict, vLLM's
guided_json / structured_outputs, the offline API) a keyword left is refused by the compile, naming it
(grammar/compiler.py).
"""

from __future__ import annotations

import logging
import re
from typing import Any, Optional

from agentserve.grammar.interface import GrammarError
from agentserve.grammar.schema_utils import map_subschemas

_ANNOTATIONS = frozenset(("title", "description", "$comment", "examples", "default", "deprecated", "readOnly",
                          "writeOnly"))
# Keywords whose subschemas evaluate the same instance's keys / items (so unevaluated* depends on them).
_APPLICATORS = ("allOf", "anyOf", "oneOf", "not", "$ref", "$dynamicRef", "$recursiveRef", "if", "then", "else",
                "dependentSchemas", "dependencies")
_DYNAMIC_REFS = ("$dynamicRef", "$recursiveRef")
_DYNAMIC_ANCHORS = ("$dynamicAnchor", "$recursiveAnchor")
# What is left after exact_forms, one entry per group of keywords that only mean something together.
UNENFORCED_GROUPS: tuple[tuple[str, ...], ...] = (
    ("uniqueItems",), ("propertyNames",), ("contains", "minContains", "maxContains"), ("if", "then", "else"),
    ("unevaluatedProperties",), ("unevaluatedItems",), _DYNAMIC_REFS + _DYNAMIC_ANCHORS,
)
_REF_HOPS = 16
logger = logging.getLogger(__name__)
# What best_effort logged: agents send the same tools and formats on every turn.
_LOGGED: set[str] = set()
_LOGGED_MAX = 1024


def _is_any(value: Any) -> bool:
    """A schema every value matches: true, {} or only annotations."""
    return value is True or (isinstance(value, dict) and not set(value) - _ANNOTATIONS)


def _resolve(root: Any, schema: Any) -> Any:
    """`schema` with local references followed ("#/$defs/X"); None where one does not resolve."""
    for _ in range(_REF_HOPS):
        if not (isinstance(schema, dict) and isinstance(schema.get("$ref"), str) and len(schema) == 1 + len(
                set(schema) & _ANNOTATIONS)):
            return schema
        ref = schema["$ref"]
        if not ref.startswith("#"):
            return None
        node = root
        for part in [p for p in ref[1:].split("/") if p]:
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        schema = node
    return None


def _listed_names(names_schema: Any) -> Optional[list[str]]:
    """The key names a propertyNames schema of enum / const allows (strings only: keys are strings)."""
    if not isinstance(names_schema, dict):
        return None
    rest = set(names_schema) - _ANNOTATIONS - {"type", "enum", "const"}
    string_type = names_schema.get("type", "string") == "string" or (
        isinstance(names_schema.get("type"), list) and "string" in names_schema["type"])
    if rest or not string_type:
        return None
    if "const" in names_schema:
        const = names_schema["const"]
        values = [const] if "enum" not in names_schema or const in names_schema["enum"] else []
    elif isinstance(names_schema.get("enum"), list):
        values = names_schema["enum"]
    else:
        return None
    return list(dict.fromkeys(v for v in values if isinstance(v, str)))


def _other_keys_schema(node: dict) -> Any:
    extra = node.get("additionalProperties", True)
    return {} if extra is True else extra


def _names_as_properties(node: dict, names: list[str]) -> Optional[dict]:
    """The object with exactly `names` as its possible keys; None where that is not the same schema."""
    props = node.get("properties", {})
    required = node.get("required", [])
    if "patternProperties" in node or not isinstance(props, dict) or not isinstance(required, list):
        return None
    if any(r not in names for r in required):
        return None  # unsatisfiable: left for the refusal to name
    extra = _other_keys_schema(node)
    listed = {k: v for k, v in props.items() if k in names}
    listed.update({n: extra for n in names if n not in props and extra is not False})
    out = {k: v for k, v in node.items() if k != "propertyNames"}
    out["properties"] = listed
    out["additionalProperties"] = False
    return out


def _pattern_as_pattern_properties(node: dict, names_schema: Any) -> Optional[dict]:
    """propertyNames {"pattern": p}: keys matching p take additionalProperties' schema, others are refused."""
    if not isinstance(names_schema, dict) or set(names_schema) - _ANNOTATIONS - {"type", "pattern"}:
        return None
    pattern = names_schema.get("pattern")
    if not isinstance(pattern, str) or names_schema.get("type", "string") != "string" or "patternProperties" in node:
        return None
    try:
        matcher = re.compile(pattern)
    except re.error:
        return None
    props = node.get("properties", {})
    required = node.get("required", [])
    if not isinstance(props, dict) or not isinstance(required, list):
        return None
    kept = {k: v for k, v in props.items() if matcher.search(k)}
    if any(isinstance(r, str) and r not in kept and not matcher.search(r) for r in required):
        return None
    extra = _other_keys_schema(node)
    out = {k: v for k, v in node.items() if k != "propertyNames"}
    if "properties" in node:
        out["properties"] = kept
    if extra is False:
        return out
    if kept and not _is_any(extra):
        return None  # a declared key matching p would be held to both schemas
    out["patternProperties"] = {pattern: extra}
    out["additionalProperties"] = False
    return out


def _property_names(node: dict, root: Any) -> dict:
    names_schema = _resolve(root, node["propertyNames"])
    if _is_any(names_schema):
        return {k: v for k, v in node.items() if k != "propertyNames"}
    names = [] if names_schema is False else _listed_names(names_schema)
    rewritten = _names_as_properties(node, names) if names is not None else \
        _pattern_as_pattern_properties(node, names_schema)
    return rewritten if rewritten is not None else node


def _unique_items(node: dict, root: Any) -> dict:
    value = node["uniqueItems"]
    items = _resolve(root, node.get("items"))
    single_value = isinstance(items, dict) and not node.get("prefixItems") and (
        "const" in items or (isinstance(items.get("enum"), list) and len(items["enum"]) == 1))
    max_items = node.get("maxItems")
    if value is False or (isinstance(max_items, int) and max_items <= 1) or items is False:
        return {k: v for k, v in node.items() if k != "uniqueItems"}
    if single_value:  # equal items: unique means at most one
        out = {k: v for k, v in node.items() if k != "uniqueItems"}
        out["maxItems"] = 1 if not isinstance(max_items, int) else min(max_items, 1)
        return out
    return node


def _contains(node: dict) -> dict:
    rest = {k: v for k, v in node.items() if k not in ("contains", "minContains", "maxContains")}
    if "contains" not in node:
        return rest  # minContains / maxContains count nothing without it
    at_least, at_most = node.get("minContains", 1), node.get("maxContains")
    if not isinstance(at_least, int) or not (at_most is None or isinstance(at_most, int)):
        return node
    if at_least == 0 and at_most is None:
        return rest  # nothing has to match
    if not _is_any(node["contains"]):
        return node
    if at_least > 0:  # every item matches: counts of items
        rest["minItems"] = max(rest.get("minItems", 0), at_least)
    if at_most is not None:
        rest["maxItems"] = at_most if not isinstance(rest.get("maxItems"), int) else min(rest["maxItems"], at_most)
    return rest


def _unevaluated(node: dict, key: str) -> dict:
    value = node[key]
    rest = {k: v for k, v in node.items() if k != key}
    if _is_any(value):
        return rest
    if any(k in node for k in _APPLICATORS) or (key == "unevaluatedItems" and "contains" in node):
        return node
    if key == "unevaluatedProperties":
        return rest if "additionalProperties" in node else {**rest, "additionalProperties": value}
    items = node.get("items")
    if isinstance(items, list):  # draft 2019 tuple: additionalItems takes the rest
        return rest if "additionalItems" in node else {**rest, "additionalItems": value}
    return rest if "items" in node else {**rest, "items": value}


def exact_forms(schema: Any) -> Any:
    """`schema` with each unenforced keyword that has an exact positive form written in it (module doc)."""
    if not isinstance(schema, dict):
        return schema
    dynamic = bool(unenforced(schema, only=_DYNAMIC_REFS))

    def fix(node: dict, path: str) -> Any:
        if "propertyNames" in node:
            node = _property_names(node, schema)
        if "uniqueItems" in node:
            node = _unique_items(node, schema)
        if any(k in node for k in ("contains", "minContains", "maxContains")):
            node = _contains(node)
        if "if" not in node or ("then" not in node and "else" not in node):
            node = {k: v for k, v in node.items() if k not in ("if", "then", "else")}
        for key in ("unevaluatedProperties", "unevaluatedItems"):
            if key in node:
                node = _unevaluated(node, key)
        if not dynamic:
            node = {k: v for k, v in node.items() if k not in _DYNAMIC_ANCHORS}
        return node

    return map_subschemas(schema, fix)


def _is_external_ref(node: dict) -> bool:
    ref = node.get("$ref")
    return ref is not None and not (isinstance(ref, str) and ref.startswith("#"))


def unenforced(schema: Any, only: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """(keyword, path) of each unenforced keyword in `schema` ("" is the root), inner ones first; an
    external `$ref` counts. `only`: just those keywords."""
    found: list[tuple[str, str]] = []
    wanted = only or tuple(k for group in UNENFORCED_GROUPS for k in group)

    def visit(node: dict, path: str) -> dict:
        found.extend((k, path) for k in node if k in wanted)
        if not only and _is_external_ref(node):
            found.append(("$ref", path))
        return node

    map_subschemas(schema, visit)
    return found


def refuse_unenforced(schema: Any, where: str) -> None:
    """GrammarError naming the first unenforced keyword of `schema` and its place (`where`: the field the
    schema came in), for a constraint that must hold exactly."""
    left = unenforced(schema)
    if left:
        keyword, path = left[0]
        raise GrammarError(f"{where}: unsupported keyword '{keyword}' at {path or 'the root'}: no grammar backend "
                           "enforces it, so the output could break the schema")


def without_unenforced(schema: Any) -> Any:
    """`schema` with every unenforced keyword (and external `$ref`) left out: a schema every output of the
    original matches, which may also match outputs the original refuses."""
    dropped = frozenset(k for group in UNENFORCED_GROUPS for k in group)

    def drop(node: dict, path: str) -> dict:
        return {k: v for k, v in node.items() if k not in dropped and not (k == "$ref" and _is_external_ref(node))}

    return map_subschemas(schema, drop)


def best_effort(schema: Any, what: str) -> Any:
    """`schema` in its exact forms, without the keywords still unenforced (see the module), each left-out
    keyword logged once per `what` ("tool 'f'", "response_format")."""
    schema = exact_forms(schema)
    left = unenforced(schema)
    if not left:
        return schema
    note = ", ".join(f"{keyword} at {path or 'the root'}" for keyword, path in left)
    key = f"{what}: {note}"
    if key not in _LOGGED and len(_LOGGED) < _LOGGED_MAX:
        _LOGGED.add(key)
        logger.warning("%s is constrained without %s (no grammar backend enforces them)", what, note)
    return without_unenforced(schema)
