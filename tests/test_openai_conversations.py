"""The Conversations API (/v1/conversations) through the official `openai` client, and responses on a
conversation: each continues on the session that holds the conversation so far (its cached_tokens
cover everything before), answers exactly as a stateless response over the same items does, and adds
its input and output to the conversation's items. Items added between responses are prefilled after
the session; deleting one the session holds moves the conversation to a new session. The OpenAI
Agents SDK's two conversation paths (Runner.run(conversation_id=...) and OpenAIConversationsSession)
run on it unmodified."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Iterator, Literal

import httpx
import openai
import pytest

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
INSTRUCTIONS = "You are a weather assistant."
GEN: dict[str, Any] = dict(model=MODEL, instructions=INSTRUCTIONS, tools=TOOLS, max_output_tokens=24, temperature=0)


class Live:
    def __init__(self, server: ServerThread, aeng: AsyncEngine, sessions: SessionStore) -> None:
        self.server, self.aeng, self.sessions = server, aeng, sessions
        self.a = openai.OpenAI(base_url=server.url + "/v1", api_key="key-a", max_retries=0, timeout=120)
        self.b = openai.OpenAI(base_url=server.url + "/v1", api_key="key-b", max_retries=0, timeout=120)
        self.http = httpx.Client(base_url=server.url, timeout=120, headers={"Authorization": "Bearer key-a"})

    def open_sessions(self) -> int:
        return int(self.aeng.call_soon(lambda: len(self.sessions)).result(timeout=10))


@pytest.fixture(scope="module")
def live() -> Iterator[Live]:
    config = EngineConfig.from_kwargs(str(tiny_model_cached("qwen2")), device="cpu", num_blocks=1024,
                                      served_model_name=MODEL, max_model_len=2048)
    aeng = AsyncEngine(Engine(config))
    sessions = SessionStore(aeng)
    tenants = Tenants([("key-a", "alice"), ("key-b", "bob")])
    server = ServerThread(create_app(aeng, config, sessions, tenants=tenants)).start()
    yield Live(server, aeng, sessions)
    server.stop()
    aeng.shutdown()


def _said(response: Any) -> list[tuple[str, str]]:
    """What a response output, without the items' ids: (type, text or name + arguments)."""
    out = []
    for item in response.output:
        if item.type == "message":
            out.append(("message", "".join(part.text for part in item.content)))
        elif item.type == "function_call":
            out.append(("function_call", item.name + item.arguments))
    return out


def _stateless(client: openai.OpenAI, items: list[Any]) -> Any:
    """The same request over the conversation's items given as input, on no stored state."""
    return client.responses.create(input=[_as_input(i) for i in items], store=False, **GEN)


def _as_input(item: Any) -> dict[str, Any]:
    d = item.model_dump(exclude_none=True) if not isinstance(item, dict) else dict(item)
    d.pop("id", None)
    d.pop("status", None)
    return d


def test_conversation_objects_and_item_pages(live: Live) -> None:
    c = live.a.conversations.create(items=[{"type": "message", "role": "user", "content": "Hi"},
                                           {"role": "assistant", "content": "Hello!"}], metadata={"topic": "demo"})
    assert c.id.startswith("conv_") and c.object == "conversation" and c.metadata == {"topic": "demo"}
    assert live.a.conversations.retrieve(c.id).created_at == c.created_at
    assert live.a.conversations.update(c.id, metadata={"topic": "weather"}).metadata == {"topic": "weather"}
    added = live.a.conversations.items.create(c.id, items=[{"role": "user", "content": "Weather?"}])
    assert len(added.data) == 1 and added.first_id == added.data[0].id
    asc = live.a.conversations.items.list(c.id, order="asc")
    assert [(i.role, i.content[0].text) for i in asc.data] == [("user", "Hi"), ("assistant", "Hello!"),
                                                                ("user", "Weather?")]
    assert [i.content[0].type for i in asc.data] == ["input_text", "output_text", "input_text"]
    desc = live.a.conversations.items.list(c.id)  # OpenAI's default order: newest first
    assert [i.id for i in desc.data] == [i.id for i in reversed(asc.data)]
    page = live.a.conversations.items.list(c.id, order="asc", limit=2)
    assert page.has_more and [i.id for i in page.data] == [i.id for i in asc.data[:2]]
    rest = live.a.conversations.items.list(c.id, order="asc", limit=2, after=page.last_id)
    assert not rest.has_more and [i.id for i in rest.data] == [asc.data[2].id]
    assert [i.id for i in live.a.conversations.items.list(c.id, order="asc")] == [i.id for i in asc.data]  # auto-pages
    assert live.a.conversations.items.retrieve(asc.data[1].id, conversation_id=c.id).role == "assistant"
    assert live.a.conversations.items.delete(asc.data[1].id, conversation_id=c.id).id == c.id
    assert [i.id for i in live.a.conversations.items.list(c.id, order="asc").data] == [asc.data[0].id, asc.data[2].id]
    with pytest.raises(openai.NotFoundError):
        live.a.conversations.items.retrieve(asc.data[1].id, conversation_id=c.id)
    # Another tenant's conversation is not found, whatever it asks.
    for call in (lambda: live.b.conversations.retrieve(c.id), lambda: live.b.conversations.items.list(c.id),
                 lambda: live.b.responses.create(conversation=c.id, input="x", **GEN)):
        with pytest.raises(openai.NotFoundError):
            call()
    # An item_reference names a stored response's item: the conversation gets a copy of it.
    stored = live.a.responses.create(input="Hello", **GEN)
    ref = live.a.conversations.items.create(c.id, items=[{"type": "item_reference", "id": stored.output[0].id}])
    assert ref.data[0].id == stored.output[0].id and ref.data[0].type == stored.output[0].type
    deleted = live.a.conversations.delete(c.id)
    assert deleted.deleted and deleted.id == c.id
    with pytest.raises(openai.NotFoundError):
        live.a.conversations.retrieve(c.id)


def test_bad_requests_name_the_field(live: Live) -> None:
    c = live.a.conversations.create()
    held = live.a.conversations.items.create(c.id, items=[{"role": "user", "content": "Hi"}]).data[0].id
    cases = [
        ("/v1/conversations", {"items": [{"role": "robot", "content": "x"}]}, "items[0].role"),
        ("/v1/conversations", {"items": [{"type": "image_generation_call"}]}, "items[0].type"),
        ("/v1/conversations", {"items": [{"role": "user", "content": "x"}] * 21}, "items"),
        ("/v1/conversations", {"metadata": {"note": "v" * 513}}, "metadata['note']"),
        (f"/v1/conversations/{c.id}/items", {"items": [{"type": "function_call", "call_id": "c", "name": "f",
                                                         "arguments": "{oops"}]}, "items[0].arguments"),
        (f"/v1/conversations/{c.id}/items", {"items": [{"id": held, "role": "user", "content": "again"}]},
         "items[0].id"),
        (f"/v1/conversations/{c.id}/items", {"items": []}, "items"),
        (f"/v1/conversations/{c.id}/items", {"items": [{"type": "item_reference", "id": "msg_nope"}]}, "items[0].id"),
        ("/v1/responses", {"model": MODEL, "input": "x", "conversation": c.id, "previous_response_id": "resp_x"},
         "conversation"),
        ("/v1/responses", {"model": MODEL, "input": "x", "conversation": {"name": c.id}}, "conversation"),
        ("/v1/responses", {"model": MODEL, "input": [{"id": held, "role": "user", "content": "x"}],
                           "conversation": c.id}, "input[0].id"),
    ]
    for path, body, param in cases:
        resp = live.http.post(path, json=body)
        assert resp.status_code in (400, 404), (path, body, resp.text)
        assert resp.json()["error"]["param"] == param, (path, body, resp.json())
    assert live.http.get(f"/v1/conversations/{c.id}/items", params={"after": "msg_nope"}).json()["error"]["param"] \
        == "after"
    # Nothing was added by the refused requests.
    assert [i.id for i in live.a.conversations.items.list(c.id).data] == [held]


def test_responses_continue_the_conversations_session(live: Live) -> None:
    """A tool loop on a conversation: the second response sends only the tool's output and answers as the same
    loop chained by previous_response_id does, both prompting the model as the whole history would: this random
    model writes its call otherwise than the template renders it, so both render the history anew, on sessions
    whose prompt the prefix cache serves up to the reply."""
    c = live.a.conversations.create()
    first_kw: dict[str, Any] = {**GEN, "tool_choice": "required", "parallel_tool_calls": False, "max_output_tokens": 80}
    first = live.a.responses.create(conversation=c.id, input="Weather in Paris?", **first_kw)
    assert first.conversation is not None and first.conversation.id == c.id
    call = next(o for o in first.output if o.type == "function_call")
    items = live.a.conversations.items.list(c.id, order="asc").data
    assert [i.type for i in items] == ["message"] + [o.type for o in first.output]
    assert items[-1].call_id == call.call_id and items[-1].id == first.output[-1].id
    second = live.a.responses.create(conversation=c.id, input=[{"type": "function_call_output",
                                                                "call_id": call.call_id, "output": "sunny"}], **GEN)
    before, after = first.usage, second.usage
    assert after.input_tokens_details.cached_tokens >= before.input_tokens // 16 * 16 - 16
    assert len(live.a.conversations.items.list(c.id).data) == 2 + len(first.output) + len(second.output)
    chained = live.a.responses.create(input="Weather in Paris?", **first_kw)
    assert _said(chained) == _said(first)
    chained_call = next(o for o in chained.output if o.type == "function_call")
    then = live.a.responses.create(previous_response_id=chained.id, input=[{
        "type": "function_call_output", "call_id": chained_call.call_id, "output": "sunny"}], **GEN)
    assert _said(then) == _said(second) and then.usage.input_tokens == second.usage.input_tokens
    # A stored response on a conversation still continues by previous_response_id, on a session of its own.
    branch = live.a.responses.create(previous_response_id=second.id, input="Thanks.", **GEN)
    assert branch.status in ("completed", "incomplete")
    assert len(live.a.conversations.items.list(c.id).data) == 2 + len(first.output) + len(second.output)


def test_items_added_between_responses_and_deleted_ones(live: Live) -> None:
    c = live.a.conversations.create()
    first = live.a.responses.create(conversation=c.id, input="Hello, who are you?", **GEN)
    live.a.conversations.items.create(c.id, items=[{"role": "user", "content": "Never mind."}])
    second = live.a.responses.create(conversation=c.id, input="Weather in Rome?", **GEN)
    # At least the first prompt's whole pages (the resident session's, or where the random reply's tokens are not how
    # the tokenizer splits its text, the prefix cache's: the continuation then runs on a new session).
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens // 16 * 16
    # The same as continuing the first response with both user messages.
    chained = live.a.responses.create(input="Hello, who are you?", **GEN)
    then = live.a.responses.create(previous_response_id=chained.id, input=[
        {"role": "user", "content": "Never mind."}, {"role": "user", "content": "Weather in Rome?"}], **GEN)
    assert _said(then) == _said(second) and then.usage.input_tokens == second.usage.input_tokens
    # Deleting an item the session holds: the next response renders what is left on a new session (as a
    # stateless request over those items does), and the old session is closed (no stored response uses it).
    items = live.a.conversations.items.list(c.id, order="asc").data
    c2 = live.a.conversations.create()
    r = live.a.responses.create(conversation=c2.id, input="Hi", store=False, **GEN)
    sessions = live.open_sessions()
    live.a.conversations.items.delete(live.a.conversations.items.list(c2.id, order="asc").data[0].id,
                                      conversation_id=c2.id)
    live.a.conversations.items.create(c2.id, items=[{"role": "user", "content": "Hello"}])
    again = live.a.responses.create(conversation=c2.id, input="Weather?", store=False, **GEN)
    left = live.a.conversations.items.list(c2.id, order="asc").data
    assert [i.id for i in left[:len(r.output)]] == [o.id for o in r.output]
    assert _said(again) == _said(_stateless(live.a, left[:-len(again.output)]))
    assert live.open_sessions() == sessions  # the conversation's new session, its old one closed
    assert len(items) == 3 + len(first.output) + len(second.output)  # two inputs, one added item, two replies
    for conv in (c, c2):
        live.a.conversations.delete(conv.id)


def test_one_response_at_a_time(live: Live) -> None:
    """While a response runs on a conversation, another response and item changes are refused with 409
    (OpenAI's clients retry it); afterwards both work."""
    c = live.a.conversations.create()
    # Long enough (ignore_eos, 512 tokens) that it is still running while the refused calls are made.
    stream = live.a.responses.create(conversation=c.id, input="Tell me a story.", stream=True,
                                     extra_body={"ignore_eos": True}, **{**GEN, "max_output_tokens": 512})
    events = iter(stream)
    assert next(events).type == "response.created"
    for call in (lambda: live.a.responses.create(conversation=c.id, input="x", **GEN),
                 lambda: live.a.conversations.items.create(c.id, items=[{"role": "user", "content": "x"}]),
                 lambda: live.a.conversations.delete(c.id)):
        with pytest.raises(openai.ConflictError):
            call()
    last = [e for e in events][-1]
    assert last.type in ("response.completed", "response.incomplete")
    # The streamed response's items were added, with the ids its events gave them; then a background one's.
    assert [i.id for i in live.a.conversations.items.list(c.id, order="asc").data][1:] == \
        [o.id for o in last.response.output]
    queued = live.a.responses.create(conversation=c.id, input="And then?", background=True, **GEN)
    deadline = time.monotonic() + 60
    while live.a.responses.retrieve(queued.id).status in ("queued", "in_progress") and time.monotonic() < deadline:
        time.sleep(0.05)
    done = live.a.responses.retrieve(queued.id)
    assert done.status in ("completed", "incomplete") and done.conversation.id == c.id
    assert live.a.conversations.items.list(c.id, limit=1).data[0].id == done.output[-1].id
    assert live.a.conversations.delete(c.id).deleted


def test_a_failed_response_changes_nothing(live: Live) -> None:
    """A response refused after it took the conversation (a prompt past the context) leaves its items and its
    session as they were, and the conversation free for the next one."""
    c = live.a.conversations.create()
    first = live.a.responses.create(conversation=c.id, input="Hello", **GEN)
    before = [i.id for i in live.a.conversations.items.list(c.id).data]
    for kw, param in ((dict(input="word " * 3000), "input"), (dict(input="Hi", max_output_tokens=2000), "max_output_tokens")):
        with pytest.raises(openai.BadRequestError) as e:
            live.a.responses.create(conversation=c.id, **{**GEN, **kw})
        assert e.value.code == "context_length_exceeded" and e.value.param == param, e.value
        assert "maximum context length is 2048 tokens" in e.value.message
    assert [i.id for i in live.a.conversations.items.list(c.id).data] == before
    after = live.a.responses.create(conversation=c.id, input="Still there?", **GEN)
    assert after.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens // 16 * 16
    live.a.conversations.delete(c.id)


def test_sessions_go_with_the_last_holder(live: Live) -> None:
    """A conversation's session is closed when nothing holds it any more: the conversation (deleted) and the
    stored responses on it (deleted), whichever goes last."""
    baseline = live.open_sessions()
    c = live.a.conversations.create()
    live.a.responses.create(conversation=c.id, input="Hi", store=False, **GEN)
    live.a.responses.create(conversation=c.id, input="Again", store=False, **GEN)
    assert live.open_sessions() == baseline + 1
    live.a.conversations.delete(c.id)
    assert live.open_sessions() == baseline
    c = live.a.conversations.create()
    kept = live.a.responses.create(conversation=c.id, input="Hi", **GEN)
    live.a.conversations.delete(c.id)
    assert live.open_sessions() == baseline + 1  # the stored response still continues from it
    assert live.a.responses.create(previous_response_id=kept.id, input="More", store=False, **GEN).status
    assert live.open_sessions() == baseline + 1  # that continuation's own session is closed with its reply
    live.a.responses.delete(kept.id)
    assert live.open_sessions() == baseline
    c = live.a.conversations.create()
    kept = live.a.responses.create(conversation=c.id, input="Hi", **GEN)
    live.a.responses.delete(kept.id)
    assert live.open_sessions() == baseline + 1  # the conversation still holds it
    live.a.conversations.delete(c.id)
    assert live.open_sessions() == baseline


# --- the OpenAI Agents SDK --------------------------------------------------------------------------------
@pytest.fixture()
def agents_sdk(live: Live) -> Any:
    agents = pytest.importorskip("agents", reason="openai-agents is not installed (pip install -e '.[dev]')")
    from openai import AsyncOpenAI

    agents.set_tracing_disabled(True)
    agents.set_default_openai_api("responses")
    agents.set_default_openai_client(AsyncOpenAI(base_url=live.server.url + "/v1", api_key="key-a", max_retries=0),
                                     use_for_tracing=False)
    return agents


def _tool_agent(agents: Any, calls: list[str]) -> Any:
    def get_weather(city: Literal["Paris", "Rome"]) -> str:
        """The current weather of a city."""
        calls.append(city)
        return f"sunny in {city}"

    return agents.Agent(name="weather", instructions="Call get_weather.", model=MODEL,
                        tools=[agents.function_tool(get_weather)], tool_use_behavior="stop_on_first_tool",
                        model_settings=agents.ModelSettings(tool_choice="required", parallel_tool_calls=False,
                                                            max_tokens=32, temperature=0))


def test_agents_sdk_server_managed_conversation(agents_sdk: Any, live: Live) -> None:
    """Runner.run(conversation_id=...): the SDK sends only new items; the server keeps the rest."""
    calls: list[str] = []
    c = live.a.conversations.create()
    result = agents_sdk.Runner.run_sync(_tool_agent(agents_sdk, calls), "Weather in Paris?", conversation_id=c.id)
    assert result.final_output == f"sunny in {calls[0]}"
    items = live.a.conversations.items.list(c.id, order="asc").data
    assert items[0].type == "message" and items[0].content[0].text == "Weather in Paris?"
    assert "function_call" in [i.type for i in items]
    again = agents_sdk.Runner.run_sync(_tool_agent(agents_sdk, calls), "And Rome?", conversation_id=c.id)
    assert again.final_output == f"sunny in {calls[1]}"
    usage = again.raw_responses[0].usage
    assert usage.input_tokens_details.cached_tokens > 0  # the earlier run's items came from the session


def test_agents_sdk_openai_conversations_session(agents_sdk: Any, live: Live) -> None:
    """OpenAIConversationsSession: the SDK keeps the history in a conversation through its items API
    (create, list, add, pop, clear)."""
    from agents.memory import OpenAIConversationsSession

    calls: list[str] = []

    async def run() -> tuple[list[Any], Any]:
        session = OpenAIConversationsSession()
        agent = _tool_agent(agents_sdk, calls)
        await agents_sdk.Runner.run(agent, "Weather in Paris?", session=session)
        await agents_sdk.Runner.run(agent, "And Rome?", session=session)
        history = await session.get_items()
        popped = await session.pop_item()
        left = await session.get_items()
        await session.clear_session()
        return [history, popped, left], session

    (history, popped, left), _ = asyncio.run(run())
    texts = [json.dumps(i.get("content")) for i in history if i.get("type") == "message"]
    assert any("Weather in Paris?" in t for t in texts) and any("And Rome?" in t for t in texts)
    assert len(calls) == 2 and len(left) == len(history) - 1 and popped["id"] == history[-1]["id"]


def test_a_tenants_conversations_are_bounded_in_bytes() -> None:
    """Items live in host memory: a tenant's conversations together take at most the configured bytes (429 past
    it); deleting items or conversations gives the room back, and other tenants have their own."""
    from agentserve.adapters.openai.conversations_store import ConversationStore
    from agentserve.adapters.openai.protocol import OpenAIError

    def item(n: int) -> dict[str, Any]:
        return {"id": f"msg_{n}", "type": "message", "role": "user", "content": [{"type": "input_text", "text": "x" * 300}]}

    store = ConversationStore(max_per_tenant=4, max_bytes_per_tenant=1000)
    a = store.create("alice", {}, [item(0), item(1)])
    with pytest.raises(OpenAIError) as e:
        store.check_room(a, [item(2), item(3)], "items")
    assert e.value.status == 429 and "1000" in e.value.message
    store.create("bob", {}, [item(0), item(1)])  # bob's bytes are his own
    store.delete_item(a, 0)
    store.check_room(a, [item(2)], "items")  # room again
    store.append(a, [item(2)])
    with pytest.raises(OpenAIError):
        store.create("alice", {}, [item(3), item(4)])
    store.remove(a)
    store.create("alice", {}, [item(3), item(4)])
    for _ in range(3):
        store.create("bob", {}, [])
    with pytest.raises(OpenAIError) as e:
        store.create("bob", {}, [])
    assert e.value.status == 429 and e.value.code == "too_many_conversations"
