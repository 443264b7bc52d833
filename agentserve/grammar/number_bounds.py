"""Exclusive number bounds llguidance crosses: a `"type": "number"` range with no integer strictly inside and an
exclusive bound at an integer let that integer itself through (`{"exclusiveMinimum": 1, "exclusiveMaximum": 1.5}`
wrote 1, `{"minimum": -1.5, "exclusiveMaximum": -1}` wrote -1). Such a bound becomes the inclusive bound one
step inside it (X + 1e-9 for an exclusive minimum X): every number it admits is inside the original range, and
the numbers it leaves out, between X and X + 1e-9, are none a model writes. Ranges holding an integer, integer
types and bounds too large for the step to move them are left as they are."""

from __future__ import annotations

import math
from typing import Any

from agentserve.grammar.interface import GrammarError
from agentserve.grammar.schema_utils import map_subschemas

STEP = 1e-9
_EXACT_INTEGERS = 2 ** 53  # beyond this a double (llguidance's number bounds) skips integers
_INT64_MIN = -(2 ** 63 - 1024)  # and its negation (llguidance fails on -2**63: "Failed to generate regex")
_INT64_MAX_DOUBLE = 2 ** 63 - 1024  # the largest double an int64 holds
_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
_LARGEST_MOVED = 1e6  # beyond this, X + STEP rounds back to X in a double


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integral(value: Any) -> bool:
    return _number(value) and float(value).is_integer() and abs(value) <= _LARGEST_MOVED


def _fix(node: dict, path: str) -> dict:
    kinds = node.get("type")
    if not (kinds == "number" or (isinstance(kinds, list) and "number" in kinds)):
        return node
    low: Any = node.get("exclusiveMinimum", node.get("minimum"))
    high: Any = node.get("exclusiveMaximum", node.get("maximum"))
    if not (_number(low) and _number(high)) or math.floor(low) + 1 < high:
        return node  # unbounded on a side, or an integer lies strictly inside
    out = dict(node)
    if _integral(out.get("exclusiveMinimum")):
        bound = out.pop("exclusiveMinimum")
        out["minimum"] = max(float(bound) + STEP, out.get("minimum", -math.inf))
    if _integral(out.get("exclusiveMaximum")):
        bound = out.pop("exclusiveMaximum")
        out["maximum"] = min(float(bound) - STEP, out.get("maximum", math.inf))
    return out


def exclusive_integer_bounds_stepped(schema: Any) -> Any:
    """`schema` with each such bound stepped inside (see the module)."""
    return map_subschemas(schema, _fix)


def _double_at_or_above(value: float) -> int:
    f = float(value)
    return int(f if f >= value else math.nextafter(f, math.inf))


def _double_at_or_below(value: float) -> int:
    f = float(value)
    return int(f if f <= value else math.nextafter(f, -math.inf))


def _bounds_as_doubles(node: dict, path: str, backend: str) -> dict:
    if not any(_number(node.get(k)) and abs(node[k]) > _EXACT_INTEGERS for k in _BOUNDS):
        return node
    out = dict(node)
    low, high = out.pop("exclusiveMinimum", None), out.pop("exclusiveMaximum", None)
    if _number(low):  # above it: at or above the next double (every double past 2**53 is an integer)
        above = float(low) if float(low) > low else math.nextafter(float(low), math.inf)
        out["minimum"] = max(_double_at_or_above(above), out.get("minimum", -math.inf))
    if _number(high):
        below = float(high) if float(high) < high else math.nextafter(float(high), -math.inf)
        out["maximum"] = min(_double_at_or_below(below), out.get("maximum", math.inf))
    if _number(out.get("minimum")):
        out["minimum"] = max(_double_at_or_above(out["minimum"]), _INT64_MIN)
    if _number(out.get("maximum")):
        out["maximum"] = min(_double_at_or_below(out["maximum"]), _INT64_MAX_DOUBLE)
    if out.get("minimum", _INT64_MIN) > min(out.get("maximum", _INT64_MAX_DOUBLE), _INT64_MAX_DOUBLE):
        raise GrammarError(f"{backend} cannot keep the bounds at {path or 'the root'} exactly: it reads them as "
                           "doubles within the int64 range, and no number of that range fits them")
    return out


def bounds_as_doubles(schema: Any, backend: str) -> Any:
    """`schema` with each number bound past 2**53 moved inward to a double: llguidance reads bounds as doubles
    (and integer ones within int64), so `"minimum": 9007199254740993` let 9007199254740992 through and 10**19
    became 2**63 - 1. A minimum becomes the nearest double at or above it, a maximum the nearest at or below
    (within +-(2**63 - 1024), the largest doubles in int64), an exclusive bound the nearest double inside it: every
    number the new bounds admit is inside the old ones, and the ones they leave out lie within one double's
    step of a bound past 2**53 (int64 fields' own limits among them). Bounds no int64 number fits are refused."""
    return map_subschemas(schema, lambda node, path: _bounds_as_doubles(node, path, backend))
