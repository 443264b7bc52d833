"""Generates the gRPC stubs in this package from proto/agentserve/v1/agent.proto (the source of
truth), and copies that .proto into the package (agent.proto, shipped as package data).

    python -m agentserve.service.gen_stubs            # regenerate agent_pb2.py, agent_pb2_grpc.py, agent_pb2.pyi
    python -m agentserve.service.gen_stubs --check    # exit 1 when the committed stubs are stale

Generated stubs check the grpcio version at import (they refuse an older grpcio than the grpcio-tools
that wrote them), so they are generated with grpcio-tools GRPCIO_TOOLS_VERSION, the oldest grpcio we
support (the benchmark GPU machine has grpcio 1.84). That version is installed beside the project,
not into the environment:

    python3 -m pip install --no-deps --target .grpc-tools grpcio-tools==1.84.0

(`.grpc-tools/` at the repository root is found automatically; AGENTSERVE_GRPC_TOOLS=<dir> points
elsewhere). The sha256 of the .proto is recorded in `_stub_info.py`, so a test fails as soon as the
.proto changes without regenerating, even where grpcio-tools 1.84 is not installed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

GRPCIO_TOOLS_VERSION = "1.84.0"
PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parents[1]
PROTO_ROOT = REPO_ROOT / "proto"
PROTO_REL = "agentserve/v1/agent.proto"
PACKAGED_PROTO = "agent.proto"
STUB_FILES = ("agent_pb2.py", "agent_pb2_grpc.py", "agent_pb2.pyi")
_GENERATED_IMPORT = "from agentserve.v1 import agent_pb2 as"
_FIXED_IMPORT = "from agentserve.service import agent_pb2 as"


def proto_sha256(proto_root: Path = PROTO_ROOT) -> str:
    return hashlib.sha256((proto_root / PROTO_REL).read_bytes()).hexdigest()


def find_grpc_tools(explicit: Optional[str] = None) -> Optional[Path]:
    """A directory holding grpc_tools of GRPCIO_TOOLS_VERSION (a pip --target dir), or None."""
    candidates = [explicit, os.environ.get("AGENTSERVE_GRPC_TOOLS"), str(REPO_ROOT / ".grpc-tools")]
    for c in candidates:
        if not c:
            continue
        path = Path(c)
        if (path / "grpc_tools").is_dir() and any(path.glob(f"grpcio_tools-{GRPCIO_TOOLS_VERSION}*.dist-info")):
            return path
    return None


def generate(out_dir: Path, tools_dir: Path, proto_root: Path = PROTO_ROOT) -> dict[str, str]:
    """Runs protoc (grpcio-tools from tools_dir) into out_dir; returns {file name: contents}."""
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, PYTHONPATH=str(tools_dir))
        cmd = [sys.executable, "-m", "grpc_tools.protoc", f"-I{proto_root}", f"--python_out={tmp}",
               f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", str(proto_root / PROTO_REL)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"protoc failed ({proc.returncode}): {proc.stderr.strip()}")
        produced = Path(tmp) / "agentserve" / "v1"
        files = {}
        for name in STUB_FILES:
            text = (produced / name).read_text()
            if name == "agent_pb2_grpc.py":
                if _GENERATED_IMPORT not in text:
                    raise RuntimeError(f"unexpected import layout in generated {name}")
                text = text.replace(_GENERATED_IMPORT, _FIXED_IMPORT)
            files[name] = text
    # The installed package carries a copy of the .proto (`agentserve proto` prints its path).
    files[PACKAGED_PROTO] = (proto_root / PROTO_REL).read_text()
    files["_stub_info.py"] = (
        '"""Written by gen_stubs.py with the stubs: what they were generated from."""\n\n'
        f'PROTO_SHA256 = "{proto_sha256(proto_root)}"\n'
        f'GRPCIO_TOOLS_VERSION = "{GRPCIO_TOOLS_VERSION}"\n')
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (out_dir / name).write_text(text)
    return files


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tools", help="directory holding grpcio-tools " + GRPCIO_TOOLS_VERSION)
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    tools = find_grpc_tools(args.tools)
    if tools is None:
        print(f"grpcio-tools {GRPCIO_TOOLS_VERSION} not found; install it with:\n  python3 -m pip install "
              f"--no-deps --target {REPO_ROOT / '.grpc-tools'} grpcio-tools=={GRPCIO_TOOLS_VERSION}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        files = generate(Path(tmp), tools)
        if args.check:
            stale = [n for n, t in files.items() if not (PACKAGE_DIR / n).is_file() or (PACKAGE_DIR / n).read_text() != t]
            if stale:
                print(f"stale stubs: {', '.join(stale)}; run python -m agentserve.service.gen_stubs", file=sys.stderr)
                return 1
            print("stubs are up to date")
            return 0
        for name in files:
            shutil.copyfile(Path(tmp) / name, PACKAGE_DIR / name)
    print(f"wrote {', '.join(files)} to {PACKAGE_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
