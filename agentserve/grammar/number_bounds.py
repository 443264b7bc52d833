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


def check_bounds_exact(schema: Any, backend: str) -> None:
    """GrammarError where a bound cannot be kept exactly: llguidance reads number bounds as doubles (and
    integer ones as int64), so `"minimum": 9007199254740993` let 9007199254740992 through and 10**19 became
    2**63 - 1. An integer bound past 2**53 is refused, naming it (an output must never break its schema)."""
    def check(node: dict, path: str) -> dict:
        for key in _BOUNDS:
            value = node.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and abs(value) > _EXACT_INTEGERS:
                raise GrammarError(f"{backend} cannot keep the bound {key} {value} exactly (at {path or 'the root'}): "
                                   f"integer bounds are limited to +-2**53")
        return node

    map_subschemas(schema, check)
