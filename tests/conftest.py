"""Shared fixtures. Every engine a test creates must end the test with all pages free."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from typing import Iterator

import pytest
import torch

from agentserve.engine.engine import Engine

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def pages_free_after_test(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Engine]]:
    """Page invariant (DESIGN.md): when nothing is running and no session is open, every page is free."""
    created: list[Engine] = []
    original_init = Engine.__init__

    def recording_init(self: Engine, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        original_init(self, *args, **kwargs)
        created.append(self)

    monkeypatch.setattr(Engine, "__init__", recording_init)
    yield created
    for engine in created:
        if not engine.has_unfinished() and not getattr(engine, "keeps_pages", False):
            engine.pool.check_all_free()
