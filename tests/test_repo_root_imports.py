"""Code run from the repository root (a script there, `python -c`, a notebook) puts the root on sys.path, where
its kernels/ directory (agentserve.kernels) would shadow Hugging Face's `kernels` package: transformers imports
that one while loading a Llama config, and failed with "cannot import name 'CUDAProperties' from 'kernels'".
kernels/__init__.py loads the installed package in its place when imported under the top-level name."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

from agentserve.testing import tiny_model_cached

ROOT = Path(__file__).resolve().parent.parent


def run_from_root(code: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}  # conftest sets it for subprocesses
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_a_llama_model_loads_from_the_repository_root() -> None:
    path = tiny_model_cached("llama3")
    proc = run_from_root(
        "import sys; assert sys.path[0] == '', sys.path[:2]\n"
        "from agentserve.llm import LLM\n"
        f"llm = LLM({str(path)!r}, dtype='float32')\n"
        "from agentserve import SamplingParams\n"
        "out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, ignore_eos=True))\n"
        "print(len(out[0].outputs[0].token_ids))\n")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-1] == "3"


def test_the_top_level_name_is_the_installed_package_and_agentserve_kernels_is_this_one() -> None:
    proc = run_from_root("import agentserve.kernels as ours\n"
                         "print(ours.__file__)\n"
                         "import kernels\n"
                         "print(kernels.__file__)\n")
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        assert proc.returncode != 0 and "no `kernels` package is installed" in proc.stderr
        return
    assert proc.returncode == 0, proc.stderr[-2000:]
    ours, theirs = (Path(line) for line in proc.stdout.split())
    assert ours == ROOT / "kernels" / "__init__.py"
    assert theirs.parent != ROOT / "kernels"  # the installed package (the venv may sit inside the checkout)

