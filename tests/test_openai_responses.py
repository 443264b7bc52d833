"""The Responses API (/v1/responses) through the official `openai` client, on resident sessions:
function tools and function_call / function_call_output items, previous_response_id continuing on
the session (cached_tokens covering the whole earlier conversation), the official streaming events,
retrieve, delete, input_items, item_reference, store=false, text.format, tenant ownership and TTL expiry."""

from __future__ import annotations

import json
import time
from typing import Any, Iterator

import httpx
import jsonschema
import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from agentserve.adapters.openai.app import create_app
from agentserve.adapters.openai.server import ServerThread
from agentserve.config import EngineConfig
from agentserve.engine.async_engine import AsyncEngine
from agentserve.engine.engine import Engine
from agentserve.service.tenants import Tenants
from agentserve.sessions.store import SessionStore
from agentserve.testing.tiny import tiny_model_cached

MODEL = "tiny-qwen2"
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}}, "required": ["city"],
           "additionalProperties": False}
TOOLS = [{"type": "function", "name": "get_weather", "description": "Current weather of a city.",
          "parameters": WEATHER}]
ANSWER = {"type": "object", "properties": {"temperature": {"type": "integer"}}, "required": ["temperature"],
          "additionalProperties": False}
INSTRUCTIONS = "You are a weather assistant. Call get_weather, then answer."


class Live:
    def __init__(self, server: ServerThread, aeng: AsyncEngine) -> None:
        self.server, self.aeng = server, aeng
        self.a = openai.OpenAI(base_url=server.url + "/v1", api_key="key-a", max_retries=0, timeout=120)
        self.b = openai.OpenAI(base_url=server.url + "/v1", api_key="key-b", max_retries=0, timeout=120)
        self.http = httpx.Client(base_url=server.url, timeout=120, headers={"Authorization": "Bearer key-a"})


def _engine() -> tuple[EngineConfig, AsyncEngine]:
    config = EngineConfig.from_kwargs(str(tiny_model_cached("qwen2")), device="cpu", num_blocks=1024,
                                      served_model_name=MODEL, max_model_len=2048)
    return config, AsyncEngine(Engine(config))


@pytest.fixture(scope="module")
def live() -> Iterator[Live]:
    config, aeng = _engine()
    tenants = Tenants([("key-a", "alice"), ("key-b", "bob")])
    server = ServerThread(create_app(aeng, config, tenants=tenants)).start()
    yield Live(server, aeng)
    server.stop()
    aeng.shutdown()


def _call_of(response: Any) -> Any:
    calls = [o for o in response.output if o.type == "function_call"]
    assert calls, f"no function call in {response.output}"
    return calls[0]


def _first_turn(client: openai.OpenAI, **kw: Any) -> Any:
    return client.responses.create(model=MODEL, instructions=INSTRUCTIONS, input="Weather in Paris?", tools=TOOLS,
                                   tool_choice="required", parallel_tool_calls=False, max_output_tokens=80,
                                   temperature=0, **kw)


def test_function_call_then_continuation_on_the_session(live: Live) -> None:
    first = _first_turn(live.a)
    assert first.object == "response" and first.status == "completed" and first.model == MODEL
    call = _call_of(first)
    assert call.name == "get_weather" and call.call_id and call.id.startswith("fc_")
    jsonschema.validate(json.loads(call.arguments), WEATHER)
    assert first.usage.input_tokens_details.cached_tokens == 0
    assert first.usage.total_tokens == first.usage.input_tokens + first.usage.output_tokens
    # The continuation prompts the model as the whole history sent again would (OpenAI's rule): this random
    # model wrote its call with other JSON spacing than the template renders, so the continuation is rendered
    # from the history, on a new session whose prompt the prefix cache holds up to the reply.
    output = [{"type": "function_call_output", "call_id": call.call_id, "output": "18 degrees, sunny"}]
    second = live.a.responses.create(model=MODEL, previous_response_id=first.id, instructions=INSTRUCTIONS,
                                     tools=TOOLS, max_output_tokens=12, temperature=0, input=output)
    whole = live.a.responses.create(model=MODEL, instructions=INSTRUCTIONS, tools=TOOLS, max_output_tokens=12,
                                    temperature=0, store=False, input=[
                                        {"role": "user", "content": "Weather in Paris?"},
                                        *[o.model_dump(exclude_none=True) for o in first.output], *output])
    assert second.usage.input_tokens == whole.usage.input_tokens and second.output_text == whole.output_text
    cached = second.usage.input_tokens_details.cached_tokens
    assert first.usage.input_tokens - 16 <= cached < second.usage.input_tokens  # the prompt's whole pages
    assert second.previous_response_id == first.id
    # A third turn continues the second in the same way.
    third = live.a.responses.create(model=MODEL, previous_response_id=second.id, instructions=INSTRUCTIONS,
                                    tools=TOOLS, input="And tomorrow?", max_output_tokens=8, temperature=0)
    assert third.usage.input_tokens_details.cached_tokens >= second.usage.input_tokens // 16 * 16


def test_branching_continuations_both_answer(live: Live) -> None:
    """Two continuations of one response: the first may take the resident session, the second starts
    from the stored conversation (the prefix cache still serves the shared part); both prompt the model
    alike (the same request gave another prompt and reply the second time when the session held the
    model's call as written and the template rendered it otherwise)."""
    first = _first_turn(live.a)
    kw = dict(model=MODEL, previous_response_id=first.id, instructions=INSTRUCTIONS, tools=TOOLS,
              max_output_tokens=6, temperature=0)
    a = live.a.responses.create(input="Thanks. And Rome?", **kw)
    b = live.a.responses.create(input="Thanks. And Rome?", **kw)
    assert a.usage.input_tokens == b.usage.input_tokens and a.output_text == b.output_text
    assert b.status in ("completed", "incomplete") and b.usage.output_tokens > 0
    for r in (a, b):  # the prompt before the reply is shared, in whole pages
        assert r.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens // 16 * 16 - 16
    assert live.a.responses.retrieve(b.id).previous_response_id == first.id


def test_streaming_events(live: Live) -> None:
    events = list(live.a.responses.create(model=MODEL, input="Say something.", max_output_tokens=10, temperature=0,
                                          stream=True))
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == final.output_text
    if text:
        for t in ("response.output_item.added", "response.content_part.added", "response.output_text.done",
                  "response.content_part.done", "response.output_item.done"):
            assert t in types
    assert live.a.responses.retrieve(final.id).output_text == final.output_text
    # Streamed function calls: argument deltas, then done with the whole arguments.
    events = list(_first_turn(live.a, stream=True))
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert len(done) == 1 and done[0].arguments == deltas
    assert _call_of(events[-1].response).arguments == deltas
    jsonschema.validate(json.loads(deltas), WEATHER)


def test_objects_validate_against_the_client_schema(live: Live) -> None:
    """Every response object and event validates against the openai client's own models (strict: the
    client builds them without validation, but typed consumers validate them), with and without calls."""
    body = {"model": MODEL, "input": "Weather in Paris?", "tools": TOOLS, "max_output_tokens": 30, "temperature": 0}
    for choice in ("required", "none"):
        resp = live.http.post("/v1/responses", json=dict(body, tool_choice=choice))
        assert resp.status_code == 200, resp.text
        Response.model_validate(resp.json())
        with live.http.stream("POST", "/v1/responses", json=dict(body, tool_choice=choice, stream=True)) as s:
            events = [json.loads(line[len("data: "):]) for line in s.iter_lines() if line.startswith("data: ")]
        for event in events:
            TypeAdapter(ResponseStreamEvent).validate_python(event)
        assert events[-1]["response"]["usage"]["input_tokens_details"]["cache_write_tokens"] == 0


def test_retrieve_delete_input_items(live: Live) -> None:
    r = live.a.responses.create(model=MODEL, input=[{"role": "user", "content": "Hi"},
                                                    {"role": "user", "content": [{"type": "input_text", "text": "!"}]}],
                                max_output_tokens=4, temperature=0)
    got = live.a.responses.retrieve(r.id)
    assert got.id == r.id and got.output_text == r.output_text and got.usage.output_tokens == r.usage.output_tokens
    items = live.a.responses.input_items.list(r.id, order="asc")
    assert [i.type for i in items.data] == ["message", "message"]
    # OpenAI's item shape (a list of parts, a status): a string content was listed as sent.
    assert [i.content[0].text for i in items.data] == ["Hi", "!"] and {i.status for i in items.data} == {"completed"}
    from openai.types.responses import ResponseItem
    for raw in live.http.get(f"/v1/responses/{r.id}/input_items").json()["data"]:
        TypeAdapter(ResponseItem).validate_python(raw)
    deleted = live.http.delete(f"/v1/responses/{r.id}")
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    with pytest.raises(openai.NotFoundError, match="not found"):
        live.a.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        live.a.responses.create(model=MODEL, previous_response_id=r.id, input="again", max_output_tokens=2)


def test_item_references_stand_for_the_stored_items(live: Live) -> None:
    """OpenAI's manual conversation state: input items of type item_reference name an earlier response's input or
    output items, and the request is the one that spells those items out (same prompt tokens); an unknown id, or
    another tenant's, is a 404 naming the reference."""
    first = _first_turn(live.a)
    asked = live.a.responses.input_items.list(first.id, order="asc").data[0]
    call = _call_of(first)
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"}
    by_ref = live.a.responses.create(model=MODEL, instructions=INSTRUCTIONS, tools=TOOLS, max_output_tokens=4,
                                     temperature=0, store=False, input=[
                                         {"type": "item_reference", "id": asked.id},
                                         {"type": "item_reference", "id": call.id}, result])
    spelled = live.a.responses.create(model=MODEL, instructions=INSTRUCTIONS, tools=TOOLS, max_output_tokens=4,
                                      temperature=0, store=False, input=[
                                          {"role": "user", "content": "Weather in Paris?"},
                                          {"type": "function_call", "call_id": call.call_id, "name": call.name,
                                           "arguments": call.arguments}, result])
    assert by_ref.usage.input_tokens == spelled.usage.input_tokens and by_ref.output_text == spelled.output_text
    for client, ref in ((live.a, "msg_nope"), (live.b, asked.id)):  # unknown; another tenant's
        with pytest.raises(openai.NotFoundError) as err:
            client.responses.create(model=MODEL, input=[{"type": "item_reference", "id": ref}], max_output_tokens=2)
        assert err.value.body["param"] == "input[0].id" and ref in err.value.body["message"]


def test_an_item_id_held_by_several_responses_or_tenants_stays_referable(live: Live) -> None:
    """The references were one server-wide map keyed by the item id: another tenant storing an input item of
    the same id took it over (the owner's reference became a 404), and a later response that got an output
    back as input took it too, so deleting that one lost the item of a response still stored."""
    note = {"type": "message", "role": "user", "id": "msg_note_42", "content": [{"type": "input_text", "text": "Hi"}]}
    mine = live.a.responses.create(model=MODEL, input=[note], max_output_tokens=2, temperature=0)
    live.b.responses.create(model=MODEL, input=[dict(note, content=[{"type": "input_text", "text": "Bob's"}])],
                            max_output_tokens=2, temperature=0)
    ref = [{"type": "item_reference", "id": "msg_note_42"}]
    again = live.a.responses.create(model=MODEL, input=ref, max_output_tokens=2, temperature=0, store=False)
    assert again.usage.input_tokens == mine.usage.input_tokens  # alice's item, not bob's
    first = _first_turn(live.a)
    out = first.output[0].model_dump(exclude_none=True)
    second = live.a.responses.create(model=MODEL, input=[out], max_output_tokens=2, temperature=0)
    live.a.responses.delete(second.id)
    resolved = live.a.responses.create(model=MODEL, input=[{"type": "item_reference", "id": out["id"]}],
                                       max_output_tokens=2, temperature=0, store=False)
    assert resolved.usage.input_tokens > 0  # still first's output item


def test_store_false_is_not_kept(live: Live) -> None:
    r = live.a.responses.create(model=MODEL, input="Hi", store=False, max_output_tokens=3, temperature=0)
    assert r.store is False and r.usage.output_tokens > 0
    with pytest.raises(openai.NotFoundError):
        live.a.responses.retrieve(r.id)
    # store=false continuing a stored response: answered on a fork, the stored one stays continuable.
    first = _first_turn(live.a)
    call = _call_of(first)
    item = [{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}]
    kw = dict(model=MODEL, previous_response_id=first.id, instructions=INSTRUCTIONS, tools=TOOLS, input=item,
              max_output_tokens=5, temperature=0)
    ephemeral = live.a.responses.create(store=False, **kw)
    kept = live.a.responses.create(**kw)
    assert ephemeral.output_text == kept.output_text
    assert kept.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens // 16 * 16


def test_responses_belong_to_their_tenant(live: Live) -> None:
    r = live.a.responses.create(model=MODEL, input="Hi", max_output_tokens=2, temperature=0)
    with pytest.raises(openai.NotFoundError):
        live.b.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        live.b.responses.create(model=MODEL, previous_response_id=r.id, input="mine now?", max_output_tokens=2)
    assert live.a.responses.retrieve(r.id).id == r.id


def test_typed_final_answer_with_tools(live: Live) -> None:
    fmt = {"format": {"type": "json_schema", "name": "answer", "schema": ANSWER, "strict": True}}
    for seed in range(3):
        r = live.a.responses.create(model=MODEL, input="Weather in Paris?", tools=TOOLS, text=fmt,
                                    max_output_tokens=60, temperature=1.0, extra_body={"seed": seed})
        calls = [o for o in r.output if o.type == "function_call"]
        if r.status != "completed":
            continue
        if calls:
            for c in calls:
                jsonschema.validate(json.loads(c.arguments), WEATHER)
        else:
            jsonschema.validate(json.loads(r.output_text), ANSWER)


def test_bad_requests_name_the_field(live: Live) -> None:
    cases = [
        (dict(input="x", tools=[{"type": "web_search"}]), "tools[0].type"),
        (dict(input=[{"type": "image_generation_call"}]), "input[0].type"),
        (dict(input=[{"role": "robot", "content": "x"}]), "input[0].role"),
        (dict(input="x", text={"format": {"type": "yaml"}}), "text.format.type"),
        (dict(input="x", max_output_tokens=0), "max_output_tokens"),
        (dict(input="x", max_output_tokens=10 ** 40), "max_output_tokens"),  # past int64: the engine's check
        (dict(input="x", tools=TOOLS, tool_choice={"type": "function", "name": "nope"}), "tool_choice"),
        # Tool errors name the Responses path (flat tools), not the Chat Completions one (tools[i].function).
        (dict(input="x", tools=TOOLS + TOOLS), "tools[1].name"),
        (dict(input="x", tools=[{"type": "function", "name": "f", "parameters": {
            "type": "object", "properties": {"a": {"type": "strin"}}}}]), "tools[0].parameters.properties.a.type"),
        # Input item errors name the item (not the chat message it becomes).
        (dict(input=[{"type": "function_call", "call_id": "c", "name": "get_weather", "arguments": "{oops"}]),
         "input[0].arguments"),
        (dict(input=[{"type": "function_call_output", "call_id": "c", "output": [{"type": "input_image"}]}]),
         "input[0].output[0].type"),
        # metadata is kept with the response: OpenAI's bounds (16 pairs, values up to 512 characters)
        (dict(input="x", metadata={f"k{i}": "v" for i in range(17)}), "metadata"),
        (dict(input="x", metadata={"note": "v" * 513}), "metadata['note']"),
        # State kept on OpenAI's side: answering without it would be a different reply, not a missing feature.
        (dict(input="x", prompt={"id": "pmpt_123", "version": "2"}), "prompt"),
        # Output logprobs (test_openai_responses_logprobs.py): a count past --max-logprobs, or not a count.
        (dict(input="x", top_logprobs=21), "top_logprobs"),
        (dict(input="x", top_logprobs="3"), "top_logprobs"),
        (dict(input="x", include="message.output_text.logprobs"), "include"),
    ]
    for kw, param in cases:
        resp = live.http.post("/v1/responses", json={"model": MODEL, **kw})
        assert resp.status_code == 400, (kw, resp.text)
        assert resp.json()["error"]["param"] == param, (kw, resp.json())
        assert ".function." not in resp.json()["error"]["message"], resp.json()
        assert "max_tokens" not in resp.json()["error"]["message"], resp.json()  # the engine's name for the field
    for kw in (dict(top_logprobs=0), dict(include=["reasoning.encrypted_content"])):  # what asks for nothing missing
        assert live.http.post("/v1/responses", json={"model": MODEL, "input": "x", "max_output_tokens": 2,
                                                     **kw}).status_code == 200, kw
    missing = live.http.post("/v1/responses", json={"model": MODEL, "input": "x", "previous_response_id": "resp_x"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "response_not_found"
    missing = live.http.post("/v1/responses", json={"model": MODEL, "input": "x", "conversation": "conv_123"})
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "conversation"


def test_stored_responses_expire_with_their_session() -> None:
    config, aeng = _engine()
    store = SessionStore(aeng, default_ttl=1.0, expiry_interval=0.1)
    server = ServerThread(create_app(aeng, config, store)).start()
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        r = client.responses.create(model=MODEL, input="Hi", max_output_tokens=2, temperature=0)
        assert client.responses.retrieve(r.id).id == r.id
        time.sleep(1.2)
        # What the server's periodic expiry does (serve.py starts it; this store was not started).
        assert aeng.call_soon(store.expire_idle).result(timeout=10) == 1
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(r.id)
        with pytest.raises(openai.NotFoundError):
            client.responses.create(model=MODEL, previous_response_id=r.id, input="still there?", max_output_tokens=2)
    finally:
        server.stop()
        aeng.shutdown()


def test_call_cut_off_by_max_output_tokens(live: Live) -> None:
    """A call cut off by max_output_tokens comes back as far as it got, in both modes: the response is
    incomplete (max_output_tokens) and its last item, the call, too."""
    note = [{"type": "function", "name": "note", "parameters": {
        "type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"],
        "additionalProperties": False}}]
    kw = dict(model=MODEL, input="Take a note.", tools=note, tool_choice="required", max_output_tokens=20,
              temperature=0)
    r = live.a.responses.create(**kw)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    call = _call_of(r)
    assert call.name == "note" and call.status == "incomplete" and '"text"' in call.arguments
    events = list(live.a.responses.create(stream=True, **kw))
    assert events[-1].type == "response.incomplete"
    streamed = _call_of(events[-1].response)
    assert streamed.arguments == call.arguments and streamed.status == "incomplete"
    done = [e for e in events if e.type == "response.output_item.done"]
    assert done[-1].item.status == "incomplete"


def test_an_assistants_refusal_given_back_is_its_text(live: Live) -> None:
    """A client that keeps the conversation gives back an earlier reply's refusal part (OpenAI's): it is the
    assistant's text, as on chat completions; in a user message it is still refused, naming the part."""
    said = [{"role": "user", "content": "Hi"},
            {"type": "message", "role": "assistant", "content": [{"type": "refusal", "refusal": "I can't."}]},
            {"role": "user", "content": "Why?"}]
    as_text = [said[0], {"role": "assistant", "content": "I can't."}, said[2]]
    kw: dict[str, Any] = dict(model=MODEL, max_output_tokens=4, temperature=0, store=False)
    a, b = live.a.responses.create(input=said, **kw), live.a.responses.create(input=as_text, **kw)
    assert a.usage.input_tokens == b.usage.input_tokens and a.output_text == b.output_text
    resp = live.http.post("/v1/responses", json={"model": MODEL, "input": [
        {"role": "user", "content": [{"type": "refusal", "refusal": "x"}]}]})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "input[0].content[0].type"
