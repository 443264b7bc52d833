"""The README's Layout section names every module of the package (agentserve/, adapters/, kernels/;
`__init__.py` and generated protobuf stubs need not be listed) and no file that is gone: a new module lands with its
line, as the section promises."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _layout_paths() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Layout"):]
    block = re.search(r"^```\n(.*?)^```$", section, flags=re.S | re.M)
    assert block is not None, "the Layout section has no file list"
    return [line.split()[0] for line in block.group(1).splitlines() if line.strip()]


def test_the_layout_lists_every_module_and_nothing_gone() -> None:
    listed = _layout_paths()
    modules = sorted(str(f.relative_to(ROOT)) for root in ("agentserve", "adapters", "kernels")
                     for f in (ROOT / root).rglob("*.py")
                     if f.name != "__init__.py" and not f.name.endswith(("_pb2.py", "_pb2_grpc.py")))
    assert len(modules) > 100
    assert sorted(set(modules) - set(listed)) == [], "modules the README's Layout does not list"
    assert [p for p in listed if not (ROOT / p).is_file()] == [], "files the README's Layout lists that do not exist"
    assert len(listed) == len(set(listed))
