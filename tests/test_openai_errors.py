"""Errors of the OpenAI-compatible API, each with its status and OpenAI's error shape
{"error": {"message", "type", "param", "code"}}: 401 (API key), 404 (model, route), 400 (fields,
over-long input), 413 (body size), 503 (queue full)."""

from __future__ import annotations

from typing import Any, Iterator, Optional

import httpx
import openai
import pytest

from agentserve.adapters.openai.app import create_app
from agentserve.adapters.openai.server import ServerThread
from agentserve.config import EngineConfig
from agentserve.engine.async_engine import AsyncEngine
from agentserve.engine.engine import Engine
from agentserve.testing.tiny import tiny_model_cached

MODEL = "tiny-llama3"
KEY = "sk-test-0123456789"
MAX_MODEL_LEN = 256
MESSAGES = [{"role": "user", "content": "Hi"}]


class Live:
    def __init__(self, aeng: AsyncEngine, server: ServerThread) -> None:
        self.aeng, self.server = aeng, server
        self.http = httpx.Client(base_url=server.url, timeout=60, headers={"Authorization": f"Bearer {KEY}"})
        self.client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def live() -> Iterator[Live]:
    path = tiny_model_cached("llama3")
    config = EngineConfig.from_kwargs(str(path), device="cpu", num_blocks=256, served_model_name=MODEL,
                                      max_model_len=MAX_MODEL_LEN, api_key=KEY)
    aeng = AsyncEngine(Engine(config))
    server = ServerThread(create_app(aeng, config, max_body_bytes=256 * 1024)).start()
    yield Live(aeng, server)
    server.stop()
    aeng.shutdown()


def _error(r: httpx.Response, status: int, param: Optional[str] = None, contains: str = "",
           code: Optional[str] = None) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert contains.lower() in err["message"].lower(), err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def _chat(live: Live, **fields: Any) -> httpx.Response:
    return live.http.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, "max_tokens": 4,
                                                        **fields})


# --- 401 ----------------------------------------------------------------------------------------------


def test_api_key_required(live: Live) -> None:
    url = live.server.url
    for path, method in (("/v1/models", "GET"), ("/v1/chat/completions", "POST"), ("/v1/completions", "POST")):
        r = httpx.request(method, url + path, json={"model": MODEL, "prompt": "x", "messages": MESSAGES})
        err = _error(r, 401, contains="API key", code="invalid_api_key")
        assert err["type"] == "invalid_request_error"
        r = httpx.request(method, url + path, json={"model": MODEL, "prompt": "x", "messages": MESSAGES},
                          headers={"Authorization": "Bearer wrong"})
        _error(r, 401, contains="incorrect api key", code="invalid_api_key")
    # The official client with a wrong key gets AuthenticationError; with the key it works.
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()
    assert [m.id for m in live.client.models.list().data] == [MODEL]
    # /health and /metrics stay open (as in vLLM) for probes and scrapers.
    assert httpx.get(url + "/health").status_code == 200
    assert httpx.get(url + "/metrics").status_code == 200


# --- 404 ----------------------------------------------------------------------------------------------


def test_unknown_model_or_route(live: Live) -> None:
    _error(_chat(live, model="gpt-4o"), 404, param="model", contains="`gpt-4o` does not exist",
           code="model_not_found")
    r = live.http.post("/v1/completions", json={"model": "nope", "prompt": "x"})
    _error(r, 404, param="model", code="model_not_found")
    _error(live.http.get("/v1/models/nope"), 404, param="model")
    with pytest.raises(openai.NotFoundError):
        live.client.chat.completions.create(model="other-model", messages=MESSAGES)
    _error(live.http.get("/v1/no-such-route"), 404, contains="not found")


# --- 400: fields ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fields, param, contains", [
    ({"temperature": -0.5}, "temperature", "temperature must be >= 0"),
    ({"temperature": "hot"}, "temperature", "valid number"),
    ({"top_p": 0}, "top_p", "top_p must be in (0, 1]"),
    ({"top_p": 1.5}, "top_p", "top_p"),
    ({"n": 0}, "n", "n must be"),
    ({"presence_penalty": 3}, "presence_penalty", "presence_penalty"),
    ({"frequency_penalty": -9}, "frequency_penalty", "frequency_penalty"),
    ({"max_tokens": 0}, "max_tokens", "max_tokens"),
    ({"max_completion_tokens": -1}, "max_completion_tokens", "max_tokens"),
    ({"top_k": -2}, "top_k", "top_k"),
    ({"min_p": 2}, "min_p", "min_p"),
    ({"repetition_penalty": 0}, "repetition_penalty", "repetition_penalty"),
    ({"stop": [""]}, "stop", "stop"),
    ({"stop": 5}, "stop", "stop"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs", "logprobs=true"),
    ({"logit_bias": {"x": 10}}, "logit_bias", "keys must be token ids"),
    ({"logit_bias": {"5": 101}}, "logit_bias", "[-100, 100]"),
    ({"logit_bias": {"99999999": 1}}, "logit_bias", "logit_bias keys must be token ids in [0,"),
    ({"messages": []}, "messages", "non-empty"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role", "role must be one of"),
    ({"messages": [{"role": "user"}]}, "messages[0].content", "needs content"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "must be a string"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0].type", "not supported"),
    ({"messages": "hello"}, "messages", "valid list"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content[0].text",
     "must be a string"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages[0].content[0].text",
     "got int"),
    ({"guided_grammar": "root ::= ( "}, "guided_grammar", "could not be compiled"),
    ({"structured_outputs": {"grammar": "root ::= ( "}}, "structured_outputs.grammar", "could not be compiled"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex", "could not be compiled"),
    ({"guided_choice": []}, "guided_choice", "non-empty"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice", "non-empty"),
    ({"max_completion_tokens": 100000}, "max_completion_tokens", "maximum context length"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "sometimes"}, "tool_choice",
     "tool_choice must be"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice", "'g', which is not in tools"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools.0.function.name", "required"),
    ({"response_format": {"type": "xml"}}, "response_format.type", "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "is required"),
    ({"stream_options": {"include_usage": "maybe"}}, "stream_options.include_usage", "valid boolean"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "only be given when stream is true"),
    # An empty salt was read as no salt: the request shared the unsalted prefix cache it asked to leave.
    ({"cache_salt": ""}, "cache_salt", "1 to 1024 characters"),
    ({"cache_salt": "s" * 1025}, "cache_salt", "1 to 1024 characters"),
])
def test_invalid_fields_are_400_naming_the_field(live: Live, fields: dict[str, Any], param: str,
                                                 contains: str) -> None:
    err = _error(_chat(live, **fields), 400, param=param, contains=contains)
    assert err["type"] == "invalid_request_error"


def test_an_empty_cache_salt_is_refused_on_completions_too(live: Live) -> None:
    r = live.http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 1, "cache_salt": ""})
    _error(r, 400, param="cache_salt", contains="1 to 1024 characters")


def test_missing_fields_and_bad_json(live: Live) -> None:
    r = live.http.post("/v1/chat/completions", json={"model": MODEL})
    _error(r, 400, param="messages", contains="'messages' is a required property")
    r = live.http.post("/v1/completions", json={"model": MODEL})
    _error(r, 400, param="prompt", contains="required")
    r = live.http.post("/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    _error(r, 400, contains="not valid JSON")
    # A body that is no JSON object says what it is instead (it said "'None' is a required property").
    for body, content_type, says in [(b"", "application/json", "body is empty"), (b"", None, "body is empty"),
                                     (b'{"model": "m"}', "text/plain", "got Content-Type: text/plain"),
                                     (b'{"model": "m"}', None, "no Content-Type header"),
                                     (b"[]", "application/json", "got a JSON array"),
                                     (b"null", "application/json", "got a JSON null")]:
        r = live.http.post("/v1/chat/completions", content=body,
                           headers={"Content-Type": content_type} if content_type else {})
        assert _error(r, 400, contains=says)["param"] is None
    r = live.http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "suffix": "y"})
    _error(r, 400, param="suffix", contains="not supported")
    r = live.http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "best_of": 3})
    _error(r, 400, param="best_of")
    r = live.http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "logprobs": 50})
    _error(r, 400, param="logprobs", contains="logprobs must be in [0, 20]")
    r = live.http.post("/v1/completions", json={"model": MODEL, "prompt": [1, 2, 10**9]})
    _error(r, 400, param="prompt", contains="token ids must be integers")
    r = live.http.post("/v1/completions", json={"model": MODEL, "prompt": []})
    _error(r, 400, param="prompt")
    # The official client raises BadRequestError carrying the same body.
    with pytest.raises(openai.BadRequestError) as info:
        live.client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=-1)
    assert info.value.status_code == 400 and info.value.body["param"] == "temperature"


def test_a_reply_the_kv_cache_cannot_hold_names_max_tokens() -> None:
    """A KV cache smaller than max_model_len (here 4 pages of 16 tokens under 256): the 400 names the field
    that asked for the room, as the context-length check does."""
    from helpers.live_server import live_openai, server_root

    with live_openai("llama3", num_blocks=4, max_model_len=256) as client:
        for path, body, field in [("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 100}, "max_tokens"),
                                  ("/v1/chat/completions", {"messages": MESSAGES, "max_completion_tokens": 100},
                                   "max_completion_tokens"),
                                  ("/v1/completions", {"prompt": "Hi", "max_tokens": 100}, "max_tokens")]:
            r = httpx.post(server_root(client) + path, json={"model": "m", **body}, timeout=60)
            _error(r, 400, param=field, contains="the KV cache has only 4", code="context_length_exceeded")


# --- over-long input ------------------------------------------------------------------------------------


def test_over_long_input(live: Live) -> None:
    long_text = "word " * (MAX_MODEL_LEN * 2)
    err = _error(_chat(live, messages=[{"role": "user", "content": long_text}]), 400, param="messages",
                 contains=f"maximum context length is {MAX_MODEL_LEN} tokens", code="context_length_exceeded")
    assert "tokens" in err["message"]
    r = live.http.post("/v1/completions", json={"model": MODEL, "prompt": long_text})
    _error(r, 400, param="prompt", code="context_length_exceeded")
    r = live.http.post("/v1/completions", json={"model": MODEL, "prompt": list(range(5, 5 + MAX_MODEL_LEN))})
    _error(r, 400, param="prompt", code="context_length_exceeded")
    # Prompt + max_tokens over the limit names max_tokens.
    r = _chat(live, max_tokens=MAX_MODEL_LEN)
    _error(r, 400, param="max_tokens", contains="in the completion", code="context_length_exceeded")
    # Without max_tokens the completion may run to the context limit.
    r = live.http.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, "seed": 1})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] <= MAX_MODEL_LEN
    # A body over the server's byte limit is refused before parsing.
    r = live.http.post("/v1/completions", json={"model": MODEL, "prompt": "x" * (300 * 1024)})
    _error(r, 413, contains="limit", code="request_too_large")
    with pytest.raises(openai.APIStatusError) as info:
        live.client.completions.create(model=MODEL, prompt="y" * (300 * 1024))
    assert info.value.status_code == 413


# --- 503 ----------------------------------------------------------------------------------------------


def test_queue_full_is_503(live: Live) -> None:
    saved = live.aeng.max_pending
    live.aeng.max_pending = 0
    try:
        r = _chat(live)
        err = _error(r, 503, contains="overloaded", code="queue_full")
        assert err["type"] == "server_error" and r.headers.get("retry-after") == "1"
        _error(_chat(live, stream=True), 503, code="queue_full")
        _error(live.http.post("/v1/completions", json={"model": MODEL, "prompt": "x"}), 503, code="queue_full")
        with pytest.raises(openai.InternalServerError) as info:
            live.client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
        assert info.value.status_code == 503
    finally:
        live.aeng.max_pending = saved
    assert _chat(live).status_code == 200


def test_the_queue_bound_counts_sequences_not_requests(live: Live) -> None:
    """vLLM V1 fans n out into n requests: 200 prompts x n=128 was one 2 KB request admitted past a bound
    of 256 (25,600 sequences), while 257 prompts x n=1 got a 503."""
    saved = live.aeng.max_pending
    live.aeng.max_pending = 8
    try:
        r = live.http.post("/v1/completions", json={"model": MODEL, "prompt": ["a", "b", "c"], "n": 3, "max_tokens": 1})
        _error(r, 400, param="prompt", contains="9 sequences (3 prompts x n=3)")
        _error(_chat(live, n=9), 400, param="n", contains="at most 8")
        ok = live.http.post("/v1/completions", json={"model": MODEL, "prompt": ["a", "b"], "n": 4, "max_tokens": 1})
        assert ok.status_code == 200 and len(ok.json()["choices"]) == 8
    finally:
        live.aeng.max_pending = saved


def test_errors_are_counted_in_metrics(live: Live) -> None:
    from agentserve.adapters.openai.metrics import parse_metrics

    before = parse_metrics(live.http.get("/metrics").text)
    _chat(live, model="nope")
    _chat(live, temperature=-3)
    after = parse_metrics(live.http.get("/metrics").text)
    key404 = 'agentserve_http_requests_total{endpoint="/v1/chat/completions",status="404"}'
    key400 = 'agentserve_http_requests_total{endpoint="/v1/chat/completions",status="400"}'
    assert after[key404] - before.get(key404, 0) == 1
    assert after[key400] - before.get(key400, 0) == 1
