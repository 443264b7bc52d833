"""The lint gate (tools/check_layout.py): ruff F + C901 (max complexity 15), mypy over the shipped code
(agentserve, kernels, adapters), files of at most 400
lines outside kernels/ and agentserve/testing/, no upward import from the core layers, no import
cycle. The known violations below are allowed until the restructure of issue #11 removes them; any
other violation fails, and so does an allowed one that is gone (delete its entry: the list only
shrinks). `python tools/check_layout.py` prints them all.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("check_layout", Path(__file__).parent.parent / "tools" / "check_layout.py")
assert _spec is not None and _spec.loader is not None
check_layout = importlib.util.module_from_spec(_spec)
sys.modules["check_layout"] = check_layout
_spec.loader.exec_module(check_layout)

# Violation key -> why it is tolerated for now. Each entry goes away with the change that fixes it.
ALLOWED: dict[str, dict[str, str]] = {
    "ruff": {},
    "types": {},
    "size": {},
    "layer": {},
    "cycle": {},
}


@pytest.fixture(scope="module")
def violations() -> dict[str, list[object]]:
    graph = check_layout.import_graph()
    return {
        "ruff": check_layout.ruff_violations(),
        "types": check_layout.type_violations(),
        "size": check_layout.size_violations(),
        "layer": check_layout.layer_violations(graph),
        "cycle": check_layout.cycle_violations(graph),
    }


@pytest.mark.parametrize("check", ["ruff", "types", "size", "layer", "cycle"])
def test_no_new_violations(check: str, violations: dict[str, list[object]]) -> None:
    new = [v for v in violations[check] if v.key not in ALLOWED[check]]  # type: ignore[attr-defined]
    assert not new, f"new {check} violations (fix them; the allow-list only shrinks):\n" + "\n".join(
        v.detail for v in new)  # type: ignore[attr-defined]


@pytest.mark.parametrize("check", ["ruff", "types", "size", "layer", "cycle"])
def test_allowed_violations_still_exist(check: str, violations: dict[str, list[object]]) -> None:
    present = {v.key for v in violations[check]}  # type: ignore[attr-defined]
    fixed = [key for key in ALLOWED[check] if key not in present]
    assert not fixed, f"fixed {check} violations: delete these ALLOWED entries in {__file__}:\n" + "\n".join(fixed)


def test_checks_catch_what_they_look_for(tmp_path: Path) -> None:
    """The import parser sees upward imports in functions and TYPE_CHECKING blocks, and a cycle that
    a deferred import hides from the interpreter."""
    cache = tmp_path / "cache.py"
    cache.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from agentserve.engine import request\n"
                     "def f():\n    from . import engine\n")
    known = {"agentserve.cache", "agentserve.engine", "agentserve.engine.request"}
    imports = check_layout.imports_of("agentserve.cache", cache, known)
    assert [(i.target, i.runtime) for i in imports] == [("agentserve.engine.request", False), ("agentserve.engine", True)]
    graph = {
        "agentserve.a": [check_layout.Import("agentserve.b", 1, True)],
        "agentserve.b": [check_layout.Import("agentserve.a", 3, True)],
        "agentserve.c": [check_layout.Import("agentserve.a", 1, False)],
        "agentserve.cache.x": [check_layout.Import("agentserve.sessions.y", 5, False)],
    }
    assert [c.key for c in check_layout.cycle_violations(graph)] == ["agentserve.a agentserve.b"]
    assert [v.key for v in check_layout.layer_violations(graph)] == ["agentserve.cache.x -> agentserve.sessions.y"]


def test_type_check_catches_a_type_error(tmp_path: Path) -> None:
    """The type gate reports what mypy finds (a gate that cannot fail would let anything through)."""
    bad = tmp_path / "bad_types.py"
    bad.write_text("def half(n: int) -> int:\n    return n / 2\n\n\ncount: int = half('4')\n")
    found = check_layout.type_violations((str(bad),))
    assert sorted(v.key.split(" ", 2)[1] for v in found) == ["arg-type", "return-value"], [v.detail for v in found]
