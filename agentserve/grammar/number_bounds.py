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


def _double_past(value: float, upward: bool, strict: bool) -> int:
    """The nearest double at `value` or past it (strictly past with `strict`) toward +inf (`upward`) or -inf,
    as an int: every double beyond 2**53 is an integer."""
    f, toward = float(value), math.inf if upward else -math.inf
    short = f < value if upward else f > value
    return int(math.nextafter(f, toward) if short or (strict and f == value) else f)


def _bounds_as_doubles(node: dict, path: str, backend: str) -> dict:
    large = [k for k in _BOUNDS if _number(node.get(k)) and abs(node[k]) > _EXACT_INTEGERS]
    if not large:
        return node
    out = dict(node)
    for key in large:  # only these move: a bound within 2**53 is a double already, and may not be an integer
        upward = key in ("minimum", "exclusiveMinimum")
        moved = _double_past(out.pop(key), upward, strict=key.startswith("exclusive"))
        if upward:
            out["minimum"] = max(moved, _INT64_MIN, out.get("minimum", -math.inf))
        else:
            out["maximum"] = min(moved, _INT64_MAX_DOUBLE, out.get("maximum", math.inf))
    lows = [out[k] for k in ("minimum", "exclusiveMinimum") if _number(out.get(k))]
    highs = [out[k] for k in ("maximum", "exclusiveMaximum") if _number(out.get(k))]
    if max(lows, default=_INT64_MIN) > min(highs + [_INT64_MAX_DOUBLE]) or min(highs, default=0) < _INT64_MIN:
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
