"""Structural tags over the HTTP API, in every place vLLM takes one: `response_format` {"type":
"structural_tag"} (both shapes), `structured_outputs.structural_tag` and the older top-level
`structural_tag` (JSON text), on chat, completions and Responses; a bad one is a 400 naming the field
and the place inside it. Sent by the official `openai` client and by raw HTTP; gRPC's ResponseFormat too."""

from __future__ import annotations

import json
from typing import Any, Iterator

import grpc
import httpx
import jsonschema
import openai
import pytest

from agentserve.service import agent_pb2 as pb
from conftest_grpc import make_engine, run_and_shutdown, serving
from helpers.live_server import live_openai, server_root

TIME = {"type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}}, "required": ["tz"],
        "additionalProperties": False}
# One call and nothing else (at_least_one + stop_after_first): a random tiny model never writes a trigger
# by itself, so this is the shape that shows the constraint holding on every request.
ONE_CALL = {"type": "structural_tag", "format": {
    "type": "triggered_tags", "triggers": ["<f="], "at_least_one": True, "stop_after_first": True,
    "tags": [{"type": "tag", "begin": "<f=time>", "content": {"type": "json_schema", "json_schema": TIME},
              "end": "</f>"}]}}
LEGACY = {"type": "structural_tag", "triggers": ["<f="],
          "structures": [{"begin": "<f=time>", "schema": TIME, "end": "</f>"}]}
MESSAGES = [{"role": "user", "content": "What time is it?"}]


def assert_one_call(text: str) -> None:
    assert text.startswith("<f=time>") and text.endswith("</f>"), text
    jsonschema.validate(json.loads(text[len("<f=time>"):-len("</f>")]), TIME)


def assert_free_text_or_calls(text: str) -> None:
    """vLLM's first shape: free text; each "<f=" starts a whole call."""
    for part in text.split("<f=")[1:]:
        assert part.startswith("time>") and "</f>" in part, text
        jsonschema.validate(json.loads(part[len("time>"):part.index("</f>")]), TIME)


@pytest.fixture(scope="module")
def live() -> Iterator[tuple[openai.OpenAI, httpx.Client]]:
    with live_openai("qwen2", max_model_len=512) as client:
        with httpx.Client(base_url=server_root(client), timeout=60) as raw:
            yield client, raw


def test_response_format_structural_tag_with_the_official_client(live: tuple[openai.OpenAI, httpx.Client]) -> None:
    client, _ = live
    for seed in range(3):
        reply = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=40, temperature=1.0,
                                               seed=seed, response_format=ONE_CALL)  # type: ignore[arg-type]
        assert reply.choices[0].finish_reason == "stop"
        assert_one_call(reply.choices[0].message.content or "")
    streamed = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=40, temperature=0,
                                              response_format=ONE_CALL, stream=True)  # type: ignore[arg-type]
    assert_one_call("".join(c.choices[0].delta.content or "" for c in streamed if c.choices))
    legacy = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=30, temperature=1.0, seed=1,
                                            response_format=LEGACY)  # type: ignore[arg-type]
    assert_free_text_or_calls(legacy.choices[0].message.content or "")


@pytest.mark.parametrize("field", ["structural_tag", "structured_outputs"])
def test_vllm_request_fields_carry_a_structural_tag(live: tuple[openai.OpenAI, httpx.Client], field: str) -> None:
    client, _ = live
    extra = {"structural_tag": json.dumps(ONE_CALL)} if field == "structural_tag" else \
        {"structured_outputs": {"structural_tag": json.dumps(ONE_CALL)}}
    chat = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=40, temperature=1.0, seed=5,
                                          extra_body=extra)
    assert_one_call(chat.choices[0].message.content or "")
    completion = client.completions.create(model="m", prompt="The time:", max_tokens=40, temperature=1.0, seed=5,
                                           extra_body=extra)
    assert_one_call(completion.choices[0].text)


def test_the_responses_api_takes_it_through_structured_outputs(live: tuple[openai.OpenAI, httpx.Client]) -> None:
    client, _ = live
    response = client.responses.create(model="m", input="What time is it?", max_output_tokens=40, temperature=1.0,
                                       extra_body={"structured_outputs": {"structural_tag": json.dumps(ONE_CALL)}})
    assert_one_call(response.output_text)


BAD_FORMAT = {"type": "structural_tag", "format": {"type": "triggered_tags", "triggers": ["<f="], "tags": [
    {"type": "tag", "begin": "<g=x>", "content": {"type": "json_schema", "json_schema": TIME}, "end": "</g>"}]}}


@pytest.mark.parametrize("path, body, param, says", [
    ("/v1/chat/completions", {"response_format": BAD_FORMAT}, "response_format",
     "response_format.format.tags[0].begin '<g=x>' must start with exactly one of the triggers"),
    ("/v1/chat/completions", {"response_format": {"type": "structural_tag", "format": {"type": "token"}}},
     "response_format", "response_format.format.type 'token': token-level formats are not supported"),
    ("/v1/chat/completions", {"response_format": {"type": "structural_tag", "triggers": ["<f="], "structures": [
        {"begin": "<f=a>", "schema": {"type": "array", "uniqueItems": True}, "end": "</f>"}]}},
     "response_format", "unsupported keyword 'uniqueItems'"),
    ("/v1/completions", {"structural_tag": "{not json"}, "structural_tag", "structural_tag is not valid JSON"),
    ("/v1/completions", {"structured_outputs": {"structural_tag": json.dumps(BAD_FORMAT)}},
     "structured_outputs.structural_tag", "structured_outputs.structural_tag.format.tags[0].begin"),
    ("/v1/chat/completions", {"response_format": ONE_CALL, "guided_json": TIME}, "guided_json",
     "give at most one output constraint"),
])
def test_a_bad_structural_tag_is_a_400_naming_the_field(live: tuple[openai.OpenAI, httpx.Client], path: str,
                                                        body: dict[str, Any], param: str, says: str) -> None:
    _, raw = live
    base = {"messages": MESSAGES} if path.endswith("chat/completions") else {"prompt": "x"}
    r = raw.post(path, json={"model": "m", "max_tokens": 8, **base, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and says in error["message"], error


def test_tools_with_a_structural_tag_are_refused(live: tuple[openai.OpenAI, httpx.Client]) -> None:
    _, raw = live
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
    r = raw.post("/v1/chat/completions", json={"model": "m", "messages": MESSAGES, "max_tokens": 8, "tools": tools,
                                               "response_format": ONE_CALL})
    assert r.status_code == 400 and "structural_tag" in r.json()["error"]["message"], r.text
    # the server goes on serving
    assert raw.post("/v1/chat/completions", json={"model": "m", "messages": MESSAGES, "max_tokens": 4}).status_code == 200


def test_grpc_generate_takes_a_structural_tag() -> None:
    aeng = make_engine()

    async def main() -> None:
        async with serving(aeng) as (_handle, client):
            text = ""
            async for event in client.stub.Generate(pb.GenerateRequest(
                    prompt="The time:", sampling=pb.SamplingParams(max_tokens=40, temperature=1.0, seed=2),
                    response_format=pb.ResponseFormat(type="structural_tag", structural_tag=json.dumps(ONE_CALL)))):
                if event.HasField("text"):
                    text += event.text.text
            assert_one_call(text)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in client.stub.Generate(pb.GenerateRequest(
                        prompt="hi", sampling=pb.SamplingParams(max_tokens=4),
                        response_format=pb.ResponseFormat(type="structural_tag", structural_tag=json.dumps(BAD_FORMAT)))):
                    pass
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "response_format.structural_tag.format.tags[0].begin" in err.value.details()

    run_and_shutdown(aeng, main())
