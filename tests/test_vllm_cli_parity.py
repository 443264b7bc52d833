"""`vllm serve` command lines and environment as a vLLM deployment brings them to `agentserve serve`."""

from __future__ import annotations

import pytest

from agentserve.cli import build_parser, engine_config_from_args
from agentserve.testing import tiny_model_cached


def _config(*flags: str):  # type: ignore[no-untyped-def]
    return engine_config_from_args(build_parser().parse_args(["serve", str(tiny_model_cached("qwen2")), *flags]))


def test_vllm_api_key_from_the_environment_protects_the_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM reads the key from VLLM_API_KEY when --api-key is not given: a deployment that sets it there
    must not come up open."""
    monkeypatch.setenv("VLLM_API_KEY", "secret-from-env")
    assert _config("--port", "8000").server.api_key == "secret-from-env"
    assert _config("--port", "8000", "--api-key", "flag-key").server.api_key == ["flag-key"]  # the flag wins
    monkeypatch.delenv("VLLM_API_KEY")
    assert _config("--port", "8000").server.api_key is None


def test_help_shows_no_placeholder_defaults() -> None:
    """A field whose default is built by a factory (--lora-modules: {}) showed pydantic's placeholder."""
    assert "PydanticUndefined" not in build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
