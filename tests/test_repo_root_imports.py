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
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.split()[-1] == "None"  # the empty stand-in: see the next test
        return
    assert proc.returncode == 0, proc.stderr[-2000:]
    ours, theirs = (Path(line) for line in proc.stdout.split())
    assert ours == ROOT / "kernels" / "__init__.py"
    assert theirs.parent != ROOT / "kernels"  # the installed package (the venv may sit inside the checkout)



# kernels/__init__.py looks for the installed package with PathFinder.find_spec over sys.path less the root, and
# transformers reads its version from the distribution's metadata; the subprocess makes both come back empty, as
# on a machine without Hugging Face's `kernels`.
HIDE_INSTALLED_KERNELS = (
    "import importlib.machinery\n"
    "_find = importlib.machinery.PathFinder.find_spec\n"
    "def _hidden(name, path=None, target=None):\n"
    "    return None if name == 'kernels' and path is not None else _find(name, path, target)\n"
    "importlib.machinery.PathFinder.find_spec = _hidden\n"
    "import importlib.metadata\n"
    "_version = importlib.metadata.version\n"
    "def _no_kernels_dist(name):\n"
    "    if name == 'kernels':\n"
    "        raise importlib.metadata.PackageNotFoundError(name)\n"
    "    return _version(name)\n"
    "importlib.metadata.version = _no_kernels_dist\n")


def test_without_the_installed_package_transformers_sees_none_and_a_llama_config_loads() -> None:
    # The GPU machine has no Hugging Face `kernels`: transformers' availability check imported this directory
    # under the top-level name, got an ImportError and failed the Llama config's import (bench's HF peer).
    path = tiny_model_cached("llama3")
    proc = run_from_root(
        HIDE_INSTALLED_KERNELS
        + "from transformers.utils.import_utils import is_kernels_available\n"
        "print(is_kernels_available())\n"
        "import transformers\n"
        f"config = transformers.AutoConfig.from_pretrained({str(path)!r})\n"
        "print(type(config).__name__)\n"
        "import agentserve.kernels\n"
        "print(agentserve.kernels.get_backend())\n")
    assert proc.returncode == 0, proc.stderr[-2000:]
    available, config_class, backend = proc.stdout.split()[-3:]
    assert available == "False"
    assert config_class == "LlamaConfig"
    assert backend in ("auto", "torch", "triton")
