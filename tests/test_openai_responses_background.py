"""Background responses (`background: true`) through the official `openai` client: queued at once, polled to
the same reply a synchronous request gets, cancelled (the turn rolled back, its session and request slot
given back), streamed and resumed from a sequence number, and the errors around them (store: false,
cancelling a synchronous response, continuing one still running, another tenant's id)."""

from __future__ import annotations

import time
from typing import Any, Iterator

import httpx
import openai
import pytest
from openai.types.responses import ResponseStreamEvent
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
LONG = dict(model=MODEL, input="Count to a thousand.", max_output_tokens=1500, temperature=0,
            extra_body={"ignore_eos": True})  # runs for seconds on the CPU: long enough to act on it mid-turn


class Live:
    def __init__(self, server: ServerThread, aeng: AsyncEngine, store: SessionStore, tenants: Tenants) -> None:
        self.server, self.aeng, self.store, self.tenants = server, aeng, store, tenants
        self.a = openai.OpenAI(base_url=server.url + "/v1", api_key="key-a", max_retries=0, timeout=120)
        self.b = openai.OpenAI(base_url=server.url + "/v1", api_key="key-b", max_retries=0, timeout=120)
        self.http = httpx.Client(base_url=server.url, timeout=120, headers={"Authorization": "Bearer key-a"})

    def sessions(self) -> int:
        return len(self.store.sessions)

    def in_flight(self, name: str) -> int:
        return self.tenants._in_flight.get(name, 0)


@pytest.fixture(scope="module")
def live() -> Iterator[Live]:
    config = EngineConfig.from_kwargs(str(tiny_model_cached("qwen2")), device="cpu", num_blocks=1024,
                                      served_model_name=MODEL, max_model_len=2048)
    aeng = AsyncEngine(Engine(config))
    store = SessionStore(aeng)
    tenants = Tenants([("key-a", "alice"), ("key-b", "bob")], max_requests_per_tenant=2)
    server = ServerThread(create_app(aeng, config, store, tenants=tenants)).start()
    yield Live(server, aeng, store, tenants)
    server.stop()
    aeng.shutdown()


def _wait(client: openai.OpenAI, response_id: str, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        r = client.responses.retrieve(response_id)
        if r.status not in ("queued", "in_progress") or time.monotonic() > deadline:
            return r
        time.sleep(0.05)


def _wait_running(live: Live, response_id: str) -> None:
    """Until the turn has produced output (so a cancel lands mid-turn, not before it starts)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        r = live.a.responses.retrieve(response_id)
        assert r.status in ("queued", "in_progress"), r.status
        if r.output and r.output[0].content and r.output[0].content[0].text:
            return
        time.sleep(0.02)
    raise AssertionError("the background response produced no output in 60 s")


def test_polled_to_the_synchronous_reply(live: Live) -> None:
    kw: dict[str, Any] = dict(model=MODEL, input="Say something.", max_output_tokens=12, temperature=0)
    sync = live.a.responses.create(**kw)
    queued = live.a.responses.create(background=True, **kw)
    assert queued.background is True and queued.status in ("queued", "in_progress") and queued.output == []
    done = _wait(live.a, queued.id)
    assert done.status == sync.status and done.background is True
    assert done.output_text == sync.output_text and done.usage.output_tokens == sync.usage.output_tokens
    # A completed background response is a stored response: it can be continued and its items listed.
    assert [i.id for i in live.a.responses.input_items.list(done.id).data]
    nxt = live.a.responses.create(model=MODEL, previous_response_id=done.id, input="More.", max_output_tokens=3,
                                  temperature=0)
    assert nxt.usage.input_tokens_details.cached_tokens >= done.usage.input_tokens
    assert live.in_flight("alice") == 0


def test_cancel_rolls_the_turn_back(live: Live) -> None:
    before = live.sessions()
    r = live.a.responses.create(background=True, **LONG)
    _wait_running(live, r.id)
    assert live.in_flight("alice") == 1  # the background turn keeps the create's request slot
    cancelled = live.a.responses.cancel(r.id)
    assert cancelled.status == "cancelled" and cancelled.id == r.id
    assert live.a.responses.retrieve(r.id).status == "cancelled"
    assert live.a.responses.cancel(r.id).status == "cancelled"  # cancelling twice answers the same
    assert live.sessions() == before and live.in_flight("alice") == 0
    with pytest.raises(openai.NotFoundError):  # a cancelled response was never stored: nothing to continue
        live.a.responses.create(model=MODEL, previous_response_id=r.id, input="go on", max_output_tokens=2)


def test_cancel_and_continue_errors(live: Live) -> None:
    sync = live.a.responses.create(model=MODEL, input="Hi", max_output_tokens=2, temperature=0)
    with pytest.raises(openai.BadRequestError, match="Cannot cancel a synchronous response"):
        live.a.responses.cancel(sync.id)
    with pytest.raises(openai.NotFoundError):
        live.a.responses.cancel("resp_unknown")
    done = live.a.responses.create(model=MODEL, input="Hi", max_output_tokens=2, temperature=0, background=True)
    assert _wait(live.a, done.id).status in ("completed", "incomplete")
    with pytest.raises(openai.BadRequestError, match="already completed|already incomplete"):
        live.a.responses.cancel(done.id)
    bad = live.http.post("/v1/responses", json={"model": MODEL, "input": "x", "background": True, "store": False})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "background"
    running = live.a.responses.create(background=True, **LONG)
    try:
        cont = live.http.post("/v1/responses", json={"model": MODEL, "input": "x", "previous_response_id": running.id})
        assert cont.status_code == 400 and cont.json()["error"]["code"] == "response_in_progress"
        assert cont.json()["error"]["param"] == "previous_response_id"
        with pytest.raises(openai.NotFoundError):  # another tenant's background response
            live.b.responses.retrieve(running.id)
        with pytest.raises(openai.NotFoundError):
            live.b.responses.cancel(running.id)
    finally:
        live.a.responses.cancel(running.id)


def test_the_tenant_limit_counts_background_turns(live: Live) -> None:
    first = live.a.responses.create(background=True, **LONG)
    second = live.a.responses.create(background=True, **LONG)
    try:
        with pytest.raises(openai.RateLimitError):  # max_requests_per_tenant=2, both held by running turns
            live.a.responses.create(model=MODEL, input="Hi", max_output_tokens=2)
        assert live.b.responses.create(model=MODEL, input="Hi", max_output_tokens=2).status  # not bob's slots
    finally:
        live.a.responses.cancel(first.id)
        live.a.responses.cancel(second.id)
    assert live.in_flight("alice") == 0
    assert live.a.responses.create(model=MODEL, input="Hi", max_output_tokens=2).usage.output_tokens == 2


def _events(lines: Iterator[str]) -> list[ResponseStreamEvent]:
    adapter: TypeAdapter[ResponseStreamEvent] = TypeAdapter(ResponseStreamEvent)
    return [adapter.validate_json(line[len("data: "):]) for line in lines if line.startswith("data: ")]


def test_streamed_then_resumed_from_a_sequence_number(live: Live) -> None:
    kw: dict[str, Any] = dict(model=MODEL, input="Say something.", max_output_tokens=12, temperature=0)
    events = list(live.a.responses.create(background=True, stream=True, **kw))
    assert events[0].type == "response.created" and events[0].response.status == "queued"
    assert events[1].type == "response.in_progress" and events[-1].type in ("response.completed",
                                                                            "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    assert final.background is True
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == final.output_text
    assert final.output_text == live.a.responses.create(**kw).output_text
    # Resumed after the fourth event: the same events from sequence number 4 on.
    with live.http.stream("GET", f"/v1/responses/{final.id}", params={"stream": "true", "starting_after": 3}) as s:
        assert s.status_code == 200
        resumed = _events(s.iter_lines())
    assert [e.model_dump() for e in resumed] == [e.model_dump() for e in events[4:]]
    sync = live.a.responses.create(**kw)
    r = live.http.get(f"/v1/responses/{sync.id}", params={"stream": "true"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream"


def test_leaving_the_stream_does_not_cancel_it(live: Live) -> None:
    stream = live.a.responses.create(background=True, stream=True, model=MODEL, input="Say something.",
                                     max_output_tokens=40, temperature=0, extra_body={"ignore_eos": True})
    first = next(iter(stream))
    stream.close()
    done = _wait(live.a, first.response.id)
    assert done.status == "incomplete" and done.usage.output_tokens == 40


def test_delete_cancels_a_running_response(live: Live) -> None:
    before = live.sessions()
    r = live.a.responses.create(background=True, **LONG)
    _wait_running(live, r.id)
    assert live.a.responses.delete(r.id) is None
    with pytest.raises(openai.NotFoundError):
        live.a.responses.retrieve(r.id)
    assert live.sessions() == before and live.in_flight("alice") == 0


def test_server_shutdown_cancels_running_responses() -> None:
    config = EngineConfig.from_kwargs(str(tiny_model_cached("qwen2")), device="cpu", num_blocks=1024,
                                      served_model_name=MODEL, max_model_len=2048)
    aeng = AsyncEngine(Engine(config))
    store = SessionStore(aeng)
    server = ServerThread(create_app(aeng, config, store)).start()
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        r = client.responses.create(background=True, **LONG)
        assert client.responses.retrieve(r.id).status in ("queued", "in_progress")
    finally:
        server.stop()
    try:
        assert len(store.sessions) == 0  # the cancelled turn gave its session back before the app stopped
        assert not aeng.engine.has_unfinished()
    finally:
        aeng.shutdown()


def test_a_turn_that_fails_leaves_a_failed_response(live: Live) -> None:
    """What the synchronous request answers with a 400 (here a pattern the grammar cannot compile) fails the
    background response: status failed, the error saying why, nothing kept running or held."""
    before = live.sessions()
    fmt = {"type": "json_schema", "name": "x", "schema": {"type": "object", "properties": {
        "user": {"type": "string", "pattern": "^(?!root$)"}}, "required": ["user"]}}
    sync = live.http.post("/v1/responses", json={"model": MODEL, "input": "x", "text": {"format": fmt}})
    assert sync.status_code == 400
    r = live.http.post("/v1/responses", json={"model": MODEL, "input": "x", "text": {"format": fmt},
                                              "background": True})
    assert r.status_code == 200 and r.json()["status"] in ("queued", "in_progress")
    done = _wait(live.a, r.json()["id"])
    assert done.status == "failed" and done.error is not None and done.error.message == sync.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="already failed"):
        live.a.responses.cancel(done.id)
    assert live.sessions() == before and live.in_flight("alice") == 0


def test_a_streamed_background_turn_that_fails_at_once_says_so(live: Live) -> None:
    """Streamed, the same failure begins with response.created and ends in response.failed (the stream was
    empty: no response id, no error); the failed response's error.code is one of OpenAI's (invalid_prompt for
    an input past the context: the client's Response type refused context_length_exceeded)."""
    events = list(live.a.responses.create(model=MODEL, input="word " * 2500, background=True, stream=True,
                                          max_output_tokens=4))
    assert [e.type for e in events] == ["response.created", "response.failed"]
    assert [e.sequence_number for e in events] == [0, 1]
    failed = events[-1].response
    assert failed.status == "failed" and failed.error.code == "invalid_prompt"
    assert "maximum context length" in failed.error.message
    again = live.a.responses.retrieve(failed.id)  # the client's Response type validates the stored body
    assert again.status == "failed" and again.error.code == "invalid_prompt"
    assert live.in_flight("alice") == 0
