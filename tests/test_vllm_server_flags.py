"""`vllm serve` flags a vLLM user relies on, over real HTTP: --max-logprobs (a request asking for more
logprobs is a 400 naming its field), --response-role (the role of chat replies)."""

from __future__ import annotations

import json
from typing import Any, Iterator

import httpx
import pytest

from agentserve import LLM, SamplingParams
from agentserve.cli import build_parser, engine_config_from_args
from agentserve.errors import InvalidRequestError
from agentserve.testing import tiny_model_cached
from helpers.live_server import live_openai

MESSAGES = [{"role": "user", "content": "Say hi"}]


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with live_openai("qwen2", max_model_len=256, max_logprobs=2, response_role="bot") as client:
        base = str(client.base_url).rstrip("/").removesuffix("/v1")
        with httpx.Client(base_url=base, timeout=60) as h:
            yield h


def _post(http: httpx.Client, path: str, headers: dict[str, str] | None = None, **fields: Any) -> httpx.Response:
    body = {"model": "m", "max_tokens": 3, "temperature": 0, **fields}
    body.setdefault("messages" if path.endswith("chat/completions") else "prompt",
                    MESSAGES if path.endswith("chat/completions") else "Hello there")
    return http.post(path, json=body, headers=headers or {})


def test_cli_takes_the_vllm_flags() -> None:
    args = build_parser().parse_args(["serve", str(tiny_model_cached("qwen2")), "--max-logprobs", "5",
                                      "--response-role", "bot", "--seed", "9"])
    config = engine_config_from_args(args)
    assert config.model.max_logprobs == 5 and config.model.seed == 9
    assert config.server.response_role == "bot"


@pytest.mark.parametrize("path, fields, param", [
    ("/v1/completions", {"logprobs": 3}, "logprobs"),
    ("/v1/completions", {"prompt_logprobs": 3}, "prompt_logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 3}, "top_logprobs"),
    ("/v1/chat/completions", {"prompt_logprobs": 3}, "prompt_logprobs"),
])
def test_max_logprobs_bounds_each_logprobs_field(http: httpx.Client, path: str, fields: dict, param: str) -> None:
    r = _post(http, path, **fields)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and f"{param} must be in [0, 2], got 3" in error["message"], error
    at_limit = {k: 2 if v == 3 else v for k, v in fields.items()}
    assert _post(http, path, **at_limit).status_code == 200


def test_offline_max_logprobs() -> None:
    with LLM(str(tiny_model_cached("qwen2")), device="cpu", num_blocks=32, max_model_len=128, max_logprobs=30) as llm:
        out = llm.generate("Hello", SamplingParams(max_tokens=2, logprobs=25, prompt_logprobs=25))[0]
        assert len(out.outputs[0].logprobs[0]) >= 25  # beyond vLLM's default of 20
        with pytest.raises(InvalidRequestError, match=r"^logprobs must be in \[0, 30\], got 31"):
            llm.generate("Hello", SamplingParams(max_tokens=2, logprobs=31))
        with pytest.raises(InvalidRequestError, match=r"^prompt_logprobs must be in \[0, 30\], got 31"):
            llm.generate("Hello", SamplingParams(max_tokens=2, prompt_logprobs=31))
    with pytest.raises(ValueError, match="max_logprobs"):
        LLM(str(tiny_model_cached("qwen2")), device="cpu", max_logprobs=-2)


def test_response_role_names_chat_replies(http: httpx.Client) -> None:
    whole = _post(http, "/v1/chat/completions").json()
    assert whole["choices"][0]["message"]["role"] == "bot"
    with http.stream("POST", "/v1/chat/completions", json={"model": "m", "messages": MESSAGES, "max_tokens": 3,
                                                          "stream": True}) as r:
        first = next(json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {"))
    assert first["choices"][0]["delta"]["role"] == "bot"
    # Without a generation prompt the reply continues the last message, in its role (vLLM).
    cont = _post(http, "/v1/chat/completions", add_generation_prompt=False,
                 messages=[*MESSAGES, {"role": "assistant", "content": "Hi"}]).json()
    assert cont["choices"][0]["message"]["role"] == "assistant"
