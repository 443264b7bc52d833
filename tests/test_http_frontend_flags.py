"""vllm serve's HTTP front-end flags (agentserve/http_frontend_config.py), against a live server: HTTPS with
--ssl-keyfile / --ssl-certfile, CORS (a browser's preflight is answered before the API-key check; origins can be
restricted), --root-path, uvicorn's logging and the header limits (--h11-max-incomplete-event-size,
--h11-max-header-count) reach uvicorn and the API, --enable-force-include-usage ends every stream with
its usage, and --exclude-tools-when-tool-choice-none renders the prompt without the tools."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any

import httpx
import pytest
from agentserve.config import EngineConfig
from agentserve.service.serve import running_server
from agentserve.testing import tiny_model_cached
from helpers.live_server import live_openai
from helpers.tls import self_signed

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city.",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}]
MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]


def _config(**server: Any) -> EngineConfig:
    return EngineConfig.from_kwargs(str(tiny_model_cached("qwen2")), device="cpu", num_blocks=64, max_model_len=256,
                                    served_model_name="m", **server)


def test_https_with_a_key_and_certificate(tmp_path: Path) -> None:
    key_file, cert_file = self_signed(tmp_path)
    config = _config(ssl_keyfile=key_file, ssl_certfile=cert_file, api_key="k")

    async def main() -> None:
        async with running_server(config, grpc_port=None, http_port=0) as handle:
            url = f"127.0.0.1:{handle.http_port}"
            async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=cert_file), timeout=60) as client:
                models = await client.get(f"https://{url}/v1/models", headers={"Authorization": "Bearer k"})
                assert models.status_code == 200 and models.json()["data"][0]["id"] == "m"
                done = await client.post(f"https://{url}/v1/completions", headers={"Authorization": "Bearer k"},
                                         json={"model": "m", "prompt": "hi", "max_tokens": 2, "temperature": 0})
                assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] == 2
            async with httpx.AsyncClient(timeout=10) as plain:  # the port speaks TLS only
                with pytest.raises(httpx.HTTPError):
                    await plain.get(f"http://{url}/v1/models")

    asyncio.run(main())


@pytest.mark.parametrize("fields,says", [
    (dict(ssl_keyfile="KEY"), "ssl_keyfile and ssl_certfile go together"),
    (dict(ssl_keyfile="/nonexistent/key.pem", ssl_certfile="/nonexistent/cert.pem"), "ssl_keyfile '/nonexistent"),
    (dict(ssl_cert_reqs=2), "ssl_ca_certs"),
    (dict(uvicorn_log_level="loud"), "uvicorn_log_level"),
])
def test_bad_tls_and_log_settings_name_the_field(tmp_path: Path, fields: dict[str, Any], says: str) -> None:
    if fields.get("ssl_keyfile") == "KEY":
        fields = dict(ssl_keyfile=self_signed(tmp_path)[0])
    with pytest.raises(ValueError, match=says):
        _config(**fields)


def test_root_path_and_logging_reach_uvicorn() -> None:
    from agentserve.service.serve import _uvicorn_server

    config = _config(root_path="/llm", uvicorn_log_level="info", disable_uvicorn_access_log=True)
    uv = _uvicorn_server(object(), "127.0.0.1", 0, 1.0, config.server)
    assert uv.config.root_path == "/llm" and uv.config.access_log is False and uv.config.log_level == "info"
    default = _uvicorn_server(object(), "127.0.0.1", 0, 1.0, _config().server)
    assert default.config.root_path == "" and default.config.access_log is True and default.config.ssl_keyfile is None


def test_header_limits_are_vllms() -> None:
    """h11's own limit of an unfinished request head (16 KiB) refused a request whose headers span more than one
    socket read, e.g. a 200 KB cookie (400 'Invalid HTTP request received.'); vLLM's defaults take 4 MiB of headers
    and up to 256 of them, and more headers than the count get a 431 naming the flag."""
    from agentserve.service.serve import _uvicorn_server

    async def main(config: EngineConfig, many: int, big: bool) -> tuple[int, int, str]:
        async with running_server(config, grpc_port=None, http_port=0) as handle:
            url = f"http://127.0.0.1:{handle.http_port}/v1/models"
            async with httpx.AsyncClient(timeout=30) as client:
                head = await client.get(url, headers={"cookie": "c" * 200_000} if big else {"x-a": "1"})
                counted = await client.get(url, headers={f"x-h{i}": "v" for i in range(many)})
                return head.status_code, counted.status_code, counted.text

    big_head, too_many, says = asyncio.run(main(_config(), 300, big=True))
    assert big_head == 200 and too_many == 431 and "--h11-max-header-count" in says
    assert asyncio.run(main(_config(h11_max_header_count=8), 10, big=False))[:2] == (200, 431)
    small = _config(h11_max_incomplete_event_size=16_384, ssl_ciphers="ECDHE+AESGCM").server
    uv = _uvicorn_server(object(), "127.0.0.1", 0, 1.0, small)
    assert uv.config.h11_max_incomplete_event_size == 16_384 and uv.config.ssl_ciphers == "ECDHE+AESGCM"
    assert _uvicorn_server(object(), "127.0.0.1", 0, 1.0, _config().server).config.h11_max_incomplete_event_size == (
        4 * 1024 * 1024)


def _preflight(client: httpx.Client, origin: str) -> httpx.Response:
    return client.options("/v1/chat/completions", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})


def test_cors_preflight_is_answered_before_the_key_check_and_origins_can_be_restricted() -> None:
    with live_openai("qwen2", max_model_len=256, api_key="k") as client:
        with httpx.Client(base_url=str(client.base_url).removesuffix("/v1/"), timeout=60) as http:
            ok = _preflight(http, "https://app.example")
            assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] in ("*", "https://app.example")
            # A real request without the key is still refused, and the browser may read why (CORS headers on the 401).
            refused = http.get("/v1/models", headers={"Origin": "https://app.example"})
            assert refused.status_code == 401 and "access-control-allow-origin" in refused.headers
    with live_openai("qwen2", max_model_len=256, allowed_origins=["https://app.example"]) as client:
        with httpx.Client(base_url=str(client.base_url).removesuffix("/v1/"), timeout=60) as http:
            assert _preflight(http, "https://app.example").headers["access-control-allow-origin"] == "https://app.example"
            other = _preflight(http, "https://evil.example")
            assert other.status_code == 400 and "access-control-allow-origin" not in other.headers


def _last_chunk_usage(client: Any, **request: Any) -> Any:
    chunks = list(client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=3, temperature=0,
                                                 stream=True, **request))
    return chunks[-1].usage


def test_force_include_usage_ends_every_stream_with_its_usage() -> None:
    with live_openai("qwen2", max_model_len=256) as client:
        assert _last_chunk_usage(client) is None  # as in vLLM: only on request
    with live_openai("qwen2", max_model_len=256, enable_force_include_usage=True) as client:
        usage = _last_chunk_usage(client)
        assert usage is not None and usage.completion_tokens == 3 and usage.prompt_tokens > 0
        completion = list(client.completions.create(model="m", prompt="hi", max_tokens=2, temperature=0, stream=True))
        assert completion[-1].usage is not None and completion[-1].usage.completion_tokens == 2


def _prompt_tokens(client: Any, **request: Any) -> int:
    out = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=1, temperature=0, **request)
    return out.usage.prompt_tokens


RESPONSE_TOOLS = [{"type": "function", "name": t["function"]["name"], "description": t["function"]["description"],
                   "parameters": t["function"]["parameters"]} for t in TOOLS]


def _response_input_tokens(client: Any, **request: Any) -> int:
    out = client.responses.create(model="m", input="Weather in Paris?", max_output_tokens=1, temperature=0,
                                  store=False, **request)
    return out.usage.input_tokens


def test_tools_are_left_out_of_the_prompt_when_tool_choice_is_none_with_the_flag() -> None:
    with live_openai("qwen2", max_model_len=512) as client:
        bare = _prompt_tokens(client)
        assert _prompt_tokens(client, tools=TOOLS, tool_choice="none") > bare  # the template lists them by default
        responses_bare = _response_input_tokens(client)
        assert _response_input_tokens(client, tools=RESPONSE_TOOLS, tool_choice="none") > responses_bare
    with live_openai("qwen2", max_model_len=512, exclude_tools_when_tool_choice_none=True) as client:
        assert _prompt_tokens(client, tools=TOOLS, tool_choice="none") == bare
        assert _prompt_tokens(client, tools=TOOLS, tool_choice="auto") > bare  # only "none" drops them
        assert _response_input_tokens(client, tools=RESPONSE_TOOLS, tool_choice="none") == responses_bare


def test_api_keys_hold_under_a_root_path() -> None:
    """uvicorn puts --root-path in front of the path it hands the app (a proxy's "/v1/models" arrives as
    "/api/v1/models"): the gate read that path, so no /v1 route asked for the key (vLLM strips root_path first)."""
    from agentserve.adapters.openai.app import create_app
    from agentserve.adapters.openai.server import ServerThread
    from agentserve.engine.async_engine import AsyncEngine
    from agentserve.engine.engine import Engine
    from agentserve.service.tenants import Tenants

    config = EngineConfig.from_kwargs(str(tiny_model_cached("llama")), device="cpu", num_blocks=64,
                                      served_model_name="m")
    aeng = AsyncEngine(Engine(config))
    server = ServerThread(create_app(aeng, config, tenants=Tenants([("key-a", "alice")])), root_path="/api").start()
    try:
        body = {"model": "m", "prompt": "hi", "max_tokens": 2}
        assert httpx.get(server.url + "/v1/models").status_code == 401
        assert httpx.post(server.url + "/v1/completions", json=body,
                          headers={"Authorization": "Bearer WRONG"}).status_code == 401
        ok = httpx.post(server.url + "/v1/completions", json=body, headers={"Authorization": "Bearer key-a"})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
        assert httpx.get(server.url + "/health").status_code == 200  # open, as without a root path
    finally:
        server.stop()
        aeng.shutdown()
