"""POST /v1/responses/input_tokens through the official `openai` client (`responses.input_tokens.count`): the count
equals the input_tokens the same response then reports, stateless, continuing a stored response, on a
conversation and after truncation "auto" drops the oldest turns; the request is checked as a response is (404
for another tenant's response, 400 for bad fields) and nothing is created or held."""

from __future__ import annotations

from typing import Any, Iterator

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
TOOLS = [{"type": "function", "name": "get_weather", "description": "Current weather of a city.",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
FIELDS: dict[str, Any] = dict(model=MODEL, instructions="You are a weather assistant.", tools=TOOLS)
GEN: dict[str, Any] = dict(FIELDS, max_output_tokens=8, temperature=0)
MAX_MODEL_LEN = 512


class Live:
    def __init__(self, server: ServerThread, aeng: AsyncEngine, sessions: SessionStore) -> None:
        self.aeng, self.sessions = aeng, sessions
        self.a = openai.OpenAI(base_url=server.url + "/v1", api_key="key-a", max_retries=0, timeout=120)
        self.b = openai.OpenAI(base_url=server.url + "/v1", api_key="key-b", max_retries=0, timeout=120)

    def open_sessions(self) -> int:
        return int(self.aeng.call_soon(lambda: len(self.sessions)).result(timeout=10))


@pytest.fixture(scope="module")
def live() -> Iterator[Live]:
    config = EngineConfig.from_kwargs(str(tiny_model_cached("qwen2")), device="cpu", num_blocks=256,
                                      served_model_name=MODEL, max_model_len=MAX_MODEL_LEN)
    aeng = AsyncEngine(Engine(config))
    sessions = SessionStore(aeng)
    server = ServerThread(create_app(aeng, config, sessions, tenants=Tenants([("key-a", "alice"), ("key-b", "bob")])))
    server.start()
    yield Live(server, aeng, sessions)
    server.stop()
    aeng.shutdown()


def test_the_count_is_what_the_response_then_prefills(live: Live) -> None:
    for fields in (dict(model=MODEL), FIELDS):
        counted = live.a.responses.input_tokens.count(input="What is the weather in Paris?", **fields)
        assert counted.object == "response.input_tokens"
        reply = live.a.responses.create(input="What is the weather in Paris?", store=False,
                                        **dict(fields, max_output_tokens=8, temperature=0))
        assert counted.input_tokens == reply.usage.input_tokens > 0
    bare = live.a.responses.input_tokens.count(model=MODEL, input="What is the weather in Paris?")
    assert bare.input_tokens < counted.input_tokens  # the instructions and the tool are counted


def test_a_continuation_counts_the_chain_and_the_new_input(live: Live) -> None:
    sessions = live.open_sessions()
    first = live.a.responses.create(input="Weather in Rome?", **GEN)
    assert live.open_sessions() == sessions + 1
    counted = live.a.responses.input_tokens.count(input="And in Paris?", previous_response_id=first.id, **FIELDS)
    assert counted.input_tokens > first.usage.input_tokens + first.usage.output_tokens - 1
    assert live.open_sessions() == sessions + 1  # counting neither continues nor forks the session
    second = live.a.responses.create(input="And in Paris?", previous_response_id=first.id, **GEN)
    assert second.usage.input_tokens == counted.input_tokens
    assert second.usage.input_tokens_details.cached_tokens > 0  # and the response did continue on the session
    with pytest.raises(openai.NotFoundError):  # another tenant's response is not there for it
        live.b.responses.input_tokens.count(input="And in Paris?", previous_response_id=first.id, **FIELDS)


def test_a_conversation_counts_its_items(live: Live) -> None:
    conv = live.a.conversations.create(items=[{"type": "message", "role": "user", "content": "Weather in Rome?"}])
    live.a.responses.create(conversation=conv.id, input="Quickly, please.", **GEN)
    counted = live.a.responses.input_tokens.count(conversation=conv.id, input="And in Paris?", **FIELDS)
    reply = live.a.responses.create(conversation=conv.id, input="And in Paris?", **GEN)
    assert reply.usage.input_tokens == counted.input_tokens
    with pytest.raises(openai.BadRequestError, match=r"input\[0\]"):  # the input's own path, after the items
        live.a.responses.input_tokens.count(conversation=conv.id, input=[{"type": "bogus"}], **FIELDS)
    with pytest.raises(openai.BadRequestError, match="mutually exclusive"):
        live.a.responses.input_tokens.count(conversation=conv.id, previous_response_id=reply.id, input="x", **FIELDS)


def test_truncation_auto_counts_the_kept_turns(live: Live) -> None:
    turns: list[dict[str, Any]] = []
    for i in range(40):
        turns += [{"role": "user", "content": f"Question {i}: what is the weather in city number {i}?"},
                  {"role": "assistant", "content": f"City {i} is sunny and warm today, around {i} degrees."}]
    turns.append({"role": "user", "content": "And tomorrow?"})
    whole = live.a.responses.input_tokens.count(input=turns, **FIELDS)  # counting a prompt that does not fit is allowed
    assert whole.input_tokens > MAX_MODEL_LEN
    with pytest.raises(openai.BadRequestError) as refused:
        live.a.responses.create(input=turns, store=False, **GEN)
    assert refused.value.code == "context_length_exceeded"
    # The reply's room is the default (an eighth of the context here) unless max_output_tokens says otherwise (not
    # one of the count's fields in OpenAI's client: sent as an extra).
    for room, extra in ((MAX_MODEL_LEN // 8, {}), (8, {"max_output_tokens": 8})):
        fitted = live.a.responses.input_tokens.count(input=turns, truncation="auto", extra_body=extra, **FIELDS)
        assert MAX_MODEL_LEN - room - 40 < fitted.input_tokens <= MAX_MODEL_LEN - room  # a turn is ~30 tokens
        reply = live.a.responses.create(input=turns, truncation="auto", store=False, temperature=0, **FIELDS, **extra)
        assert reply.usage.input_tokens == fitted.input_tokens


def test_bad_requests_are_refused_as_a_response_would_be(live: Live) -> None:
    sessions = live.open_sessions()
    with pytest.raises(openai.BadRequestError, match="input"):
        live.a.responses.input_tokens.count(model=MODEL, input=[])
    with pytest.raises(openai.NotFoundError):
        live.a.responses.input_tokens.count(model="no-such-model", input="hi")
    with pytest.raises(openai.NotFoundError):
        live.a.responses.input_tokens.count(model=MODEL, input="hi", previous_response_id="resp_unknown")
    with pytest.raises(openai.NotFoundError):
        live.a.responses.input_tokens.count(model=MODEL, input="hi", conversation="conv_unknown")
    with pytest.raises(openai.BadRequestError, match="tools"):
        live.a.responses.input_tokens.count(model=MODEL, input="hi", tools=[{"type": "function", "name": "f",
                                                                              "parameters": {"type": "nonsense"}}])
    with pytest.raises(openai.BadRequestError, match="truncation"):
        live.a.responses.input_tokens.count(model=MODEL, input="hi", truncation="sometimes")  # type: ignore[arg-type]
    assert live.open_sessions() == sessions
