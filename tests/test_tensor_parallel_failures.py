"""Tensor parallelism on the CPU (two ranks over gloo): failures outside a step.

- Rank 0 failing while it builds its runner (a draft model that does not load: the draft lives on
  rank 0 only) fails the engine's start-up with that error, at once, and leaves no worker behind;
  the worker is then waiting in a start-up collective, not for a message.
"""

from __future__ import annotations

import multiprocessing
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Optional

from agentserve.llm import LLM
from agentserve.model.arch_config import ModelLoadError
from agentserve.testing import tiny_model_cached

ENGINE: dict[str, Any] = dict(device="cpu", dtype="float32", num_blocks=64)


def corrupt_draft(tmp_path: Path) -> Path:
    """A one-layer draft directory whose safetensors file is cut short."""
    draft = tmp_path / "draft"
    shutil.copytree(tiny_model_cached("llama", num_layers=1), draft)
    for weights in draft.glob("*.safetensors"):
        weights.write_bytes(weights.read_bytes()[:5000])
    return draft


def test_rank_zero_failing_to_build_its_runner_fails_start_up_at_once(tmp_path: Path) -> None:
    draft = corrupt_draft(tmp_path)
    before = set(multiprocessing.active_children())
    raised: list[Optional[BaseException]] = []

    def start() -> None:
        try:
            LLM(str(tiny_model_cached("llama")), **ENGINE, tensor_parallel_size=2, draft_model=str(draft)).close()
            raised.append(None)
        except BaseException as e:  # noqa: BLE001 - handed to the test's thread
            raised.append(e)

    # A thread, so that a start-up that hangs fails the test instead of stalling the run.
    thread = threading.Thread(target=start, daemon=True)
    started = time.monotonic()
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), "the engine's start-up hung after rank 0 failed to build its runner"
    assert time.monotonic() - started < 30
    assert len(raised) == 1 and isinstance(raised[0], ModelLoadError), raised
    assert "not a valid safetensors file" in str(raised[0])
    assert set(multiprocessing.active_children()) == before
