"""`vllm serve` flags a vLLM user relies on, over real HTTP: --max-logprobs (a request asking for more
logprobs is a 400 naming its field), --response-role (the role of chat replies), X-Request-Id (names the
completion; echoed with --enable-request-id-headers; a reused id never mixes two requests up)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import httpx
import pytest

from agentserve import LLM, SamplingParams
from agentserve.cli import build_parser, engine_config_from_args
from agentserve.errors import InvalidRequestError
from agentserve.testing import tiny_model_cached
from helpers.live_server import live_openai, server_root

MESSAGES = [{"role": "user", "content": "Say hi"}]


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with live_openai("qwen2", max_model_len=256, max_logprobs=2, response_role="bot",
                     enable_request_id_headers=True) as client:
        base = server_root(client)
        with httpx.Client(base_url=base, timeout=60) as h:
            yield h


def _post(http: httpx.Client, path: str, headers: dict[str, str] | None = None, **fields: Any) -> httpx.Response:
    body = {"model": "m", "max_tokens": 3, "temperature": 0, **fields}
    body.setdefault("messages" if path.endswith("chat/completions") else "prompt",
                    MESSAGES if path.endswith("chat/completions") else "Hello there")
    return http.post(path, json=body, headers=headers or {})


def test_cli_takes_the_vllm_flags() -> None:
    args = build_parser().parse_args(["serve", str(tiny_model_cached("qwen2")), "--max-logprobs", "5",
                                      "--response-role", "bot", "--enable-request-id-headers", "--seed", "9"])
    config = engine_config_from_args(args)
    assert config.model.max_logprobs == 5 and config.model.seed == 9
    assert config.server.response_role == "bot" and config.server.enable_request_id_headers


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


def test_x_request_id_names_the_completion_and_is_echoed(http: httpx.Client) -> None:
    r = _post(http, "/v1/chat/completions", headers={"X-Request-Id": "trace-1"})
    assert r.json()["id"] == "chatcmpl-trace-1" and r.headers["x-request-id"] == "trace-1"
    r = _post(http, "/v1/completions", headers={"X-Request-Id": "trace-2"})
    assert r.json()["id"] == "cmpl-trace-2" and r.headers["x-request-id"] == "trace-2"
    r = _post(http, "/v1/completions", request_id="from-body")  # vLLM's body field, when no header
    assert r.json()["id"] == "cmpl-from-body" and r.headers["x-request-id"]
    assert http.get("/v1/models").headers["x-request-id"]  # every response, a fresh id without one


def test_concurrent_requests_reusing_an_x_request_id_stay_apart(http: httpx.Client) -> None:
    """Two requests in flight with the same X-Request-Id: both succeed with their own tokens (a shared
    engine id would refuse one, or mix their outputs and aborts)."""
    def run(seed: int) -> dict:
        r = _post(http, "/v1/completions", headers={"X-Request-Id": "same"}, max_tokens=24, ignore_eos=True,
                  temperature=1.0, seed=seed, n=2)
        assert r.status_code == 200, r.text
        return r.json()

    alone = [run(seed) for seed in (1, 2)]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(run, [1, 2, 1, 2]))
    for i, body in enumerate(together):
        assert body["id"] == "cmpl-same"
        assert [c["text"] for c in body["choices"]] == [c["text"] for c in alone[i % 2]["choices"]]


def test_without_the_flag_no_header_is_added() -> None:
    with live_openai("qwen2", max_model_len=256) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="m", messages=MESSAGES, max_tokens=2, extra_headers={"X-Request-Id": "abc"})
        assert raw.parse().id == "chatcmpl-abc" and "x-request-id" not in raw.headers


def test_priority_without_the_priority_policy_is_a_400(http: httpx.Client) -> None:
    """vLLM refuses a priority the fcfs scheduler would ignore; --scheduling-policy is vLLM's --policy."""
    for path in ("/v1/completions", "/v1/chat/completions"):
        resp = _post(http, path, priority=3)
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["param"] == "priority" and "--scheduling-policy priority" in resp.json()["error"]["message"]
        assert _post(http, path, priority=0).status_code == 200
    path = str(tiny_model_cached("qwen2"))
    config = engine_config_from_args(build_parser().parse_args(["serve", path, "--scheduling-policy", "priority"]))
    assert config.scheduler.policy == "priority"
    with pytest.raises(SystemExit, match="different policies"):
        engine_config_from_args(build_parser().parse_args(["serve", path, "--scheduling-policy", "priority",
                                                           "--policy", "fcfs"]))
    llm = LLM(path, device="cpu", scheduling_policy="priority")
    assert llm.engine.config.scheduler.policy == "priority"
    llm.close()
    with live_openai("qwen2", max_model_len=256, policy="priority") as client:
        base = server_root(client)
        with httpx.Client(base_url=base, timeout=60) as h:
            assert _post(h, "/v1/completions", priority=3).status_code == 200
