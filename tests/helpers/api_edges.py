"""Helpers for the serving-edge tests (tests/test_api_edges_*.py): token ids out of an HTTP completion,
OpenAI-shaped error bodies, and waiting for an engine to go idle with its pages free."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Optional

import httpx

from agentserve.engine.async_engine import AsyncEngine


def completion_token_ids(body: dict[str, Any], index: int = 0) -> list[int]:
    """The generated token ids of a /v1/completions response asked for with logprobs and
    return_tokens_as_token_ids (each token is named "token_id:<id>")."""
    tokens = body["choices"][index]["logprobs"]["tokens"]
    return [int(t.split(":", 1)[1]) for t in tokens]


def greedy_body(model: str, prompt: list[int], max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "logprobs": 1, "return_tokens_as_token_ids": True, **extra}


def assert_error(r: httpx.Response, status: int, param: Optional[str], code: Optional[str] = None,
                 says: str = "") -> str:
    """Checks an OpenAI-shaped error: status, `param` naming the field, `code`, and a message holding `says`."""
    assert r.status_code == status, (r.status_code, r.text)
    error = r.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}, error
    assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    assert says in error["message"], error
    return str(error["message"])


async def wait_idle_and_clean(aeng: AsyncEngine, timeout: float = 30.0) -> None:
    """Waits until the engine runs nothing (aborts of disconnected clients land a step later), then
    checks that every page is free (no session may be open)."""
    deadline = time.monotonic() + timeout
    while aeng.engine.has_unfinished():
        assert time.monotonic() < deadline, "the engine still has requests"
        await asyncio.sleep(0.05)
    await aeng.run(aeng.engine.pool.check_all_free)

