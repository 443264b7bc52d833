"""A damaged checkpoint directory fails at start-up with a ModelLoadError naming the file and what is
wrong with it (the CLI prints ValueErrors as one line; anything else would be a traceback)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from agentserve.llm import LLM
from agentserve.model.arch_config import ModelLoadError
from agentserve.testing import tiny_model_cached


def _copy(tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_model_cached("llama"), tmp_path / "m"))


@pytest.mark.parametrize("damage", ["header", "truncated", "empty"])
def test_a_damaged_safetensors_file_is_named(tmp_path: Path, damage: str) -> None:
    path = _copy(tmp_path)
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"header": b"\xff" * 8 + data[8:], "truncated": data[: len(data) // 2], "empty": b""}[damage])
    with pytest.raises(ModelLoadError, match=r"model\.safetensors.*(not a valid|header)"):
        LLM(str(path), device="cpu", max_model_len=128)


@pytest.mark.parametrize("name", ["model.safetensors.index.json", "generation_config.json"])
def test_a_json_file_that_does_not_parse_is_named(tmp_path: Path, name: str) -> None:
    path = _copy(tmp_path)
    (path / name).write_text("{ not json")
    with pytest.raises(ModelLoadError, match=f"{name}.*not valid JSON"):
        LLM(str(path), device="cpu", max_model_len=128)


def test_an_index_without_a_weight_map_says_so(tmp_path: Path) -> None:
    path = _copy(tmp_path)
    (path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(ModelLoadError, match="weight_map"):
        LLM(str(path), device="cpu", max_model_len=128)
