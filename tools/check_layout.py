"""Layout checks for the repository: ruff (pyflakes and complexity), mypy over the package's code, file
sizes, import layers, import cycles. `python tools/check_layout.py` prints every violation and exits 1 if there is any;
tests/test_layout.py runs the same checks against an allow-list of the known ones.

Each violation has a stable key (no line numbers, no complexity scores), so that an allow-list
entry survives unrelated edits and a new violation never hides behind an old one.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

ROOT = Path(__file__).resolve().parent.parent
# Every Python tree of the repository (what ruff and the size limit look at).
PYTHON_DIRS = ("agentserve", "kernels", "adapters", "tests", "benchmarks", "tools")
# Installed under these names (pyproject's package-dir mapping).
PACKAGE_DIRS = {"agentserve": "agentserve", "kernels": "agentserve.kernels", "adapters": "agentserve.adapters"}

MAX_LINES = 400
# Kernels carry their torch references and launch code together; testing/ builds whole model dirs.
SIZE_EXEMPT_DIRS = ("kernels/", "agentserve/testing/")
GENERATED = re.compile(r"^agentserve/service/agent_pb2(_grpc)?\.py$")

# The core layers and what they must never import (DESIGN.md, "Layering").
LOWER_LAYERS = tuple(f"agentserve.{name}" for name in (
    "cache", "worker", "model", "sampling", "spec", "lora", "parallel", "kernels", "request", "errors", "config", "json_file"))
UPPER_LAYERS = tuple(f"agentserve.{name}" for name in (
    "engine", "sessions", "service", "adapters", "chat", "testing"))


@dataclass(frozen=True)
class Violation:
    check: str   # "ruff", "types", "size", "layer" or "cycle"
    key: str     # stable identity, matched against allow-lists
    detail: str  # what to look at (may carry line numbers)


def python_files() -> Iterator[Path]:
    for top in PYTHON_DIRS:
        yield from sorted((ROOT / top).rglob("*.py"))


def rel(path: Path) -> str:
    return path.resolve().relative_to(ROOT).as_posix()


# --- ruff --------------------------------------------------------------------------------------------
_SCORE = re.compile(r"\s*\(\d+ > \d+\)")


def ruff_violations() -> list[Violation]:
    """`ruff check` with the rules and complexity limit of pyproject's [tool.ruff]."""
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--output-format", "json", "--no-cache",
                           *PYTHON_DIRS], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"ruff failed (is the dev extra installed? pip install ruff): {proc.stderr.strip()}")
    found = []
    for item in json.loads(proc.stdout or "[]"):
        path = rel(Path(item["filename"]))
        message = _SCORE.sub("", item["message"])
        found.append(Violation("ruff", f"{path}: {item['code']} {message}",
                               f"{path}:{item['location']['row']}: {item['code']} {item['message']}"))
    return found


_MYPY_LINE = re.compile(r"^(?P<path>[^:]+):(?P<line>\d+): error: (?P<message>.*?)(?:  \[(?P<code>[a-z-]+)\])?$")


def type_violations(paths: tuple[str, ...] = ()) -> list[Violation]:
    """mypy over the shipped code (agentserve, its kernels and adapters; or `paths`) with pyproject's
    [tool.mypy]."""
    proc = subprocess.run([sys.executable, "-m", "mypy", "--no-error-summary", "--hide-error-context",
                           "--no-pretty", "--show-error-codes", *paths], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"mypy failed (is the dev extra installed? pip install mypy): "
                           f"{(proc.stderr or proc.stdout).strip()[-2000:]}")
    found = []
    for line in proc.stdout.splitlines():
        m = _MYPY_LINE.match(line)
        if m is None:
            continue  # notes and context lines
        path, message, code = m.group("path"), m.group("message"), m.group("code") or "error"
        found.append(Violation("types", f"{path}: {code} {message}", f"{path}:{m.group('line')}: {message} [{code}]"))
    return found


# --- file sizes --------------------------------------------------------------------------------------
def size_violations() -> list[Violation]:
    found = []
    for path in python_files():
        name = rel(path)
        if name.startswith(SIZE_EXEMPT_DIRS) or GENERATED.match(name):
            continue
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES:
            found.append(Violation("size", name, f"{name}: {lines} lines (limit {MAX_LINES})"))
    return found


# --- imports -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Import:
    target: str
    line: int
    runtime: bool  # False for imports under `if TYPE_CHECKING:` (type annotations only)


def module_files() -> dict[str, Path]:
    """Installed module name -> file, for every module of the package."""
    modules = {}
    for top, package in PACKAGE_DIRS.items():
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = list(path.relative_to(ROOT / top).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package, *parts])] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk_imports(node: ast.AST, runtime: bool) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, runtime
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            yield from _walk_imports(child, False)
        else:
            yield from _walk_imports(child, runtime)


def _resolve_from(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: Path, known: set[str]) -> list[Import]:
    """The package modules `module` imports: `from X import name` counts as importing X.name when
    that is a module, else X."""
    found = []
    for node, runtime in _walk_imports(ast.parse(path.read_text()), True):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = _resolve_from(module, path.name == "__init__.py", node)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        found.extend(Import(t, node.lineno, runtime) for t in dict.fromkeys(targets) if t in known)
    return found


def import_graph() -> dict[str, list[Import]]:
    files = module_files()
    known = set(files)
    return {module: imports_of(module, path, known) for module, path in files.items()}


def _within(module: str, roots: tuple[str, ...]) -> Optional[str]:
    return next((r for r in roots if module == r or module.startswith(r + ".")), None)


def layer_violations(graph: Optional[dict[str, list[Import]]] = None) -> list[Violation]:
    """Lower layers never import upper ones, not even inside a function or for type checking."""
    graph = graph if graph is not None else import_graph()
    found = []
    files = module_files()
    for module, imports in sorted(graph.items()):
        if _within(module, LOWER_LAYERS) is None:
            continue
        for imp in imports:
            if _within(imp.target, UPPER_LAYERS) is not None:
                where = f"{rel(files[module]) if module in files else module}:{imp.line}"
                found.append(Violation("layer", f"{module} -> {imp.target}", f"{where}: {module} imports {imp.target}"))
    return sorted(set(found), key=lambda v: v.key)


def _strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative (no recursion limit on deep graphs)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in edges.get(node, ()):
                    components.append(sorted(component))
    return components


def _one_cycle(component: list[str], edges: dict[str, set[str]]) -> list[str]:
    """A concrete cycle through the component's first module (breadth-first: a shortest one)."""
    members = set(component)
    start = component[0]
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(edges[node] & members):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if child not in parents:
                    parents[child] = node
                    following.append(child)
        frontier = following
    return component


def cycle_violations(graph: Optional[dict[str, list[Import]]] = None) -> list[Violation]:
    """Import cycles among modules. An import inside a function counts: deferring it hides a cycle
    from the interpreter, not from the design. Imports for type checking only do not count."""
    graph = graph if graph is not None else import_graph()
    edges = {m: {i.target for i in imports if i.runtime} for m, imports in graph.items()}
    found = []
    for component in _strongly_connected(edges):
        cycle = " -> ".join(_one_cycle(component, edges))
        found.append(Violation("cycle", " ".join(component),
                               f"{len(component)} modules import each other, e.g. {cycle}"))
    return found


def all_violations() -> list[Violation]:
    graph = import_graph()
    return (ruff_violations() + type_violations() + size_violations() + layer_violations(graph)
            + cycle_violations(graph))


def main() -> int:
    violations = all_violations()
    for v in violations:
        print(f"[{v.check}] {v.detail}")
    print(f"{len(violations)} violations")
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
