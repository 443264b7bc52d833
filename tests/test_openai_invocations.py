"""SageMaker's `POST /invocations` (vLLM's route): a chat completions body is that chat completion, a completions
body that completion, whole or streamed; other bodies are 400s in the /v1 routes' words; with API keys it asks for
one as /v1 does and takes a tenant's request slot."""

from __future__ import annotations

import json
from typing import Iterator, Optional

import httpx
import pytest

from agentserve.service.tenants import Tenants
from helpers.live_server import live_openai, server_root

CHAT = {"model": "m", "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 6, "temperature": 0.0}
COMPLETION = {"model": "m", "prompt": "The quick brown fox", "max_tokens": 6, "temperature": 0.0}


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with live_openai("qwen2", max_model_len=512) as client, httpx.Client(base_url=server_root(client), timeout=60) as c:
        yield c


def test_chat_and_completion_bodies_are_those_requests(http: httpx.Client) -> None:
    for body, path in ((CHAT, "/v1/chat/completions"), (COMPLETION, "/v1/completions")):
        via_sagemaker, direct = http.post("/invocations", json=body), http.post(path, json=body)
        assert via_sagemaker.status_code == direct.status_code == 200, via_sagemaker.text
        a, b = via_sagemaker.json(), direct.json()
        assert a["object"] == b["object"]
        assert [a["usage"][k] for k in ("prompt_tokens", "completion_tokens")] == \
            [b["usage"][k] for k in ("prompt_tokens", "completion_tokens")]
        assert [c.get("message", c).get("content", c.get("text")) for c in a["choices"]] == \
            [c.get("message", c).get("content", c.get("text")) for c in b["choices"]]


def test_a_streamed_chat_body_streams(http: httpx.Client) -> None:
    with http.stream("POST", "/invocations", json={**CHAT, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[0])["object"] == "chat.completion.chunk"


@pytest.mark.parametrize("content, needle, param", [
    (json.dumps({"model": "m"}), "chat completions body (with messages) or a completions body", "messages"),
    ("{not json", "The request body is not valid JSON", None),
    ("[1, 2]", "must be a JSON object", None),
    ("", "The request body is empty", None),
    (json.dumps({**CHAT, "max_tokens": "many"}), "max_tokens", "max_tokens"),
    (json.dumps({**COMPLETION, "n": 0}), "n", "n"),
])
def test_other_bodies_are_400s_naming_the_problem(http: httpx.Client, content: str, needle: str,
                                                  param: Optional[str]) -> None:
    r = http.post("/invocations", content=content, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert needle in error["message"] and error["param"] == param


def test_with_api_keys_it_asks_for_one() -> None:
    with live_openai("qwen2", max_model_len=512, tenants=Tenants([("key-a", "alice")])) as client, \
            httpx.Client(base_url=server_root(client), timeout=60) as http:
        assert http.post("/invocations", json=CHAT).status_code == 401
        assert http.post("/invocations", json=CHAT, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert http.post("/invocations", json=CHAT, headers={"Authorization": "Bearer key-a"}).status_code == 200
        assert http.get("/ping").status_code == 200  # the health check needs no key, as SageMaker's poll sends none
