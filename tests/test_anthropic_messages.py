"""Anthropic's Messages API (POST /v1/messages, /v1/messages/count_tokens) through the official `anthropic` client
and litellm's Anthropic provider. A message request is the chat completion it means: the same prompt tokens and
the same greedy reply as the OpenAI chat request written by hand (system, tool calls and results, thinking),
its tool calls as tool_use blocks valid for the tool's schema, a stop sequence and output_config's schema
honoured; the stream's events build the same message; errors come in Anthropic's shape, and its clients'
X-Api-Key header is an API key."""

from __future__ import annotations

import json
import time
from typing import Any, Iterator

import anthropic
import httpx
import jsonschema
import openai
import pytest

from agentserve.adapters.openai.app import create_app
from agentserve.adapters.openai.server import ServerThread
from agentserve.config import EngineConfig
from agentserve.engine.async_engine import AsyncEngine
from agentserve.engine.engine import Engine
from agentserve.service.tenants import Tenants
from agentserve.testing.tiny import tiny_model_cached

MODEL = "tiny"
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}}, "required": ["city"],
           "additionalProperties": False}
TOOLS: list[Any] = [{"name": "get_weather", "description": "Current weather of a city.", "input_schema": WEATHER},
                    {"name": "get_time", "description": "Local time of a city.", "input_schema": WEATHER}]
CHAT_TOOLS = [{"type": "function", "function": {"name": t["name"], "description": t["description"],
                                                "parameters": t["input_schema"]}} for t in TOOLS]
GREEDY = {"temperature": 0}  # the current SDK no longer sends sampling knobs: they go in the body
# Qwen3's template, reduced: its enable_thinking switch (an empty think block when off) and a history message's
# reasoning rendered in a think block.
QWEN3_TEMPLATE = r"""
{%- for message in messages -%}
{{- '<|im_start|>' + message.role + '\n' -}}
{%- if message.reasoning_content -%}{{- '<think>\n' + message.reasoning_content + '\n</think>\n\n' -}}{%- endif -%}
{{- (message.content or '') + '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|im_start|>assistant\n' -}}
{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\n\n</think>\n\n' -}}{%- endif -%}
{%- endif -%}
"""


class Live:
    def __init__(self, url: str, aeng: AsyncEngine) -> None:
        self.url, self.aeng = url, aeng
        self.claude = anthropic.Anthropic(base_url=url, api_key="key-a", max_retries=0, timeout=120)
        self.chat = openai.OpenAI(base_url=url + "/v1", api_key="key-a", max_retries=0, timeout=120)


def _serve(arch: str, **engine: Any) -> Iterator[Live]:
    config = EngineConfig.from_kwargs(str(tiny_model_cached(arch)), device="cpu", num_blocks=256,
                                      served_model_name=MODEL, max_model_len=1024, **engine)
    aeng = AsyncEngine(Engine(config))
    server = ServerThread(create_app(aeng, config, tenants=Tenants([("key-a", "alice")]))).start()
    yield Live(server.url, aeng)
    server.stop()
    aeng.shutdown()


@pytest.fixture(scope="module")
def live() -> Iterator[Live]:
    yield from _serve("qwen2")


@pytest.fixture(scope="module")
def thinking() -> Iterator[Live]:
    yield from _serve("qwen3", reasoning_parser="qwen3", chat_template=QWEN3_TEMPLATE)


def _same_as_chat(live: Live, message: Any, chat_messages: list[dict[str, Any]], **chat: Any) -> Any:
    """The chat completion the message request means gives the same text, stop and token counts."""
    reply = live.chat.chat.completions.create(model=MODEL, messages=chat_messages, **chat)  # type: ignore[call-overload]
    choice = reply.choices[0]
    texts = [b.text for b in message.content if b.type == "text"]
    assert "".join(texts) == (choice.message.content or "")
    assert message.stop_reason == {"length": "max_tokens", "stop": "end_turn", "tool_calls": "tool_use"}[
        choice.finish_reason]
    usage = message.usage
    assert usage.input_tokens + usage.cache_read_input_tokens == reply.usage.prompt_tokens
    assert usage.output_tokens == reply.usage.completion_tokens
    return reply


def test_a_message_is_the_chat_completion_it_means(live: Live) -> None:
    system = [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}},
              {"type": "text", "text": "Answer in English."}]
    messages: list[Any] = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
                           {"role": "user", "content": [{"type": "text", "text": "What is up?"},
                                                        {"type": "text", "text": "Tell me."}]}]
    message = live.claude.messages.create(model=MODEL, max_tokens=12, system=system, messages=messages,
                                          extra_body=GREEDY)
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    chat_messages = [{"role": "system", "content": "Be brief.\nAnswer in English."},
                     {"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
                     {"role": "user", "content": "What is up?\nTell me."}]
    reply = _same_as_chat(live, message, chat_messages, max_tokens=12, temperature=0)
    counted = live.claude.messages.count_tokens(model=MODEL, system=system, messages=messages)
    assert counted.input_tokens == reply.usage.prompt_tokens
    again = live.claude.messages.create(model=MODEL, max_tokens=12, system=system, messages=messages, extra_body=GREEDY)
    assert again.usage.cache_read_input_tokens > 0  # the prefix cache held the prompt: Anthropic's cache reads


def test_tool_calls_and_results_render_as_the_chat_tool_loop(live: Live) -> None:
    call = live.claude.messages.create(model=MODEL, max_tokens=64, tools=TOOLS, tool_choice={"type": "any"},
                                       messages=[{"role": "user", "content": "Weather in Paris?"}], extra_body=GREEDY)
    assert call.stop_reason == "tool_use"
    uses = [b for b in call.content if b.type == "tool_use"]
    assert uses and all(u.name in ("get_weather", "get_time") and u.id for u in uses)
    for u in uses:
        jsonschema.validate(u.input, WEATHER)
    named = live.claude.messages.create(model=MODEL, max_tokens=64, tools=TOOLS,
                                        tool_choice={"type": "tool", "name": "get_time",
                                                     "disable_parallel_tool_use": True},
                                        messages=[{"role": "user", "content": "Weather in Paris?"}], extra_body=GREEDY)
    assert [b.name for b in named.content if b.type == "tool_use"] == ["get_time"]
    assert named.stop_reason == "tool_use"  # a forced tool too (was end_turn: the SDK's tool runner stopped there)
    with live.claude.messages.stream(model=MODEL, max_tokens=64, tools=TOOLS, tool_choice={"type": "tool", "name": "get_time"},
                                     messages=[{"role": "user", "content": "Weather in Paris?"}], extra_body=GREEDY) as s:
        assert s.get_final_message().stop_reason == "tool_use"
    use = uses[0]
    messages: list[Any] = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Let me check."},
                                          {"type": "tool_use", "id": use.id, "name": use.name, "input": use.input}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                      "content": [{"type": "text", "text": "Sunny, 24 C"}]},
                                     {"type": "text", "text": "Thanks. Summarise."}]}]
    answer = live.claude.messages.create(model=MODEL, max_tokens=16, tools=TOOLS, messages=messages, extra_body=GREEDY)
    chat_messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [
            {"id": use.id, "type": "function", "function": {"name": use.name, "arguments": json.dumps(use.input)}}]},
        {"role": "tool", "tool_call_id": use.id, "content": "Sunny, 24 C"},
        {"role": "user", "content": "Thanks. Summarise."}]
    reply = _same_as_chat(live, answer, chat_messages, tools=CHAT_TOOLS, max_tokens=16, temperature=0)
    assert live.claude.messages.count_tokens(model=MODEL, tools=TOOLS, messages=messages).input_tokens == \
        reply.usage.prompt_tokens


def _without_ids(message: Any) -> list[dict[str, Any]]:
    return [{k: v for k, v in b.model_dump().items() if k != "id"} for b in message.content]


@pytest.mark.parametrize("tools", [False, True])
def test_the_stream_builds_the_same_message(live: Live, tools: bool) -> None:
    kw: dict[str, Any] = dict(model=MODEL, max_tokens=48, messages=[{"role": "user", "content": "Weather in Rome?"}],
                              extra_body=GREEDY)
    if tools:  # one call, which the 48 tokens hold whole
        kw.update(tools=TOOLS, tool_choice={"type": "any", "disable_parallel_tool_use": True})
    whole = live.claude.messages.create(**kw)
    with live.claude.messages.stream(**kw) as stream:
        kinds = [e.type for e in stream]
        streamed = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert kinds.count("content_block_start") == kinds.count("content_block_stop") == len(whole.content) > 0
    assert _without_ids(streamed) == _without_ids(whole)
    assert (streamed.stop_reason, streamed.usage.output_tokens) == (whole.stop_reason, whole.usage.output_tokens)
    assert streamed.usage.input_tokens + streamed.usage.cache_read_input_tokens == \
        whole.usage.input_tokens + whole.usage.cache_read_input_tokens


def test_a_client_that_leaves_mid_stream_ends_its_request(live: Live) -> None:
    body = {"model": MODEL, "max_tokens": 600, "stream": True, "ignore_eos": True,
            "messages": [{"role": "user", "content": "Write a long story."}]}
    with httpx.stream("POST", live.url + "/v1/messages", json=body, headers={"x-api-key": "key-a"}, timeout=60) as r:
        seen = []
        for line in r.iter_lines():
            seen.append(line)
            if line.startswith("event: content_block_delta"):
                break
    assert seen[0] == "event: message_start"
    deadline = time.monotonic() + 20

    def busy() -> bool:
        return bool(live.aeng.call_soon(live.aeng.engine.has_unfinished).result(timeout=10))

    while busy():  # the 600 tokens would take far longer than the wait
        assert time.monotonic() < deadline, "the request of a client that left still runs"
        time.sleep(0.05)
    live.aeng.call_soon(live.aeng.engine.pool.check_all_free).result(timeout=10)


def test_a_final_assistant_message_is_a_prefill_the_reply_continues(live: Live) -> None:
    messages: list[Any] = [{"role": "user", "content": "Name a city."}, {"role": "assistant", "content": "The city is"}]
    message = live.claude.messages.create(model=MODEL, max_tokens=8, messages=messages, extra_body=GREEDY)
    _same_as_chat(live, message, messages, max_tokens=8, temperature=0,
                  extra_body={"continue_final_message": True, "add_generation_prompt": False})
    counted = live.claude.messages.count_tokens(model=MODEL, messages=messages).input_tokens
    assert counted == message.usage.input_tokens + message.usage.cache_read_input_tokens


def test_stop_sequences_and_output_format(live: Live) -> None:
    messages: list[Any] = [{"role": "user", "content": "Say something."}]
    free = live.claude.messages.create(model=MODEL, max_tokens=24, messages=messages, extra_body=GREEDY)
    text = free.content[0].text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert stop.strip(), text
    cut = live.claude.messages.create(model=MODEL, max_tokens=24, messages=messages, stop_sequences=[stop],
                                      extra_body=GREEDY)
    assert (cut.stop_reason, cut.stop_sequence) == ("stop_sequence", stop)
    assert text.startswith(cut.content[0].text) and stop not in cut.content[0].text
    schema = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 10}, "sure": {"type": "boolean"}},
              "required": ["answer", "sure"], "additionalProperties": False}
    typed = live.claude.messages.create(model=MODEL, max_tokens=64, messages=messages, extra_body=GREEDY,
                                        output_config={"format": {"type": "json_schema", "schema": schema}})
    jsonschema.validate(json.loads(typed.content[0].text), schema)


def test_thinking_blocks_are_the_reasoning(thinking: Live) -> None:
    prompt_tokens = {}
    for kind in ("enabled", "disabled"):
        config: Any = {"type": "enabled", "budget_tokens": 1024} if kind == "enabled" else {"type": "disabled"}
        message = thinking.claude.messages.create(model=MODEL, max_tokens=16, thinking=config, extra_body=GREEDY,
                                                  messages=[{"role": "user", "content": "Why?"}])
        reply = _same_as_chat(thinking, message, [{"role": "user", "content": "Why?"}], max_tokens=16, temperature=0,
                              extra_body={"chat_template_kwargs": {"enable_thinking": kind == "enabled"}})
        reasoning = (reply.choices[0].message.model_extra or {}).get("reasoning_content")
        assert [b.thinking for b in message.content if b.type == "thinking"] == ([reasoning] if reasoning else [])
        assert bool(reasoning) == (kind == "enabled")  # off: the prompt closed the think block, all is text
        prompt_tokens[kind] = reply.usage.prompt_tokens
    assert prompt_tokens["enabled"] < prompt_tokens["disabled"]
    history: list[Any] = [{"role": "user", "content": "Why?"},
                          {"role": "assistant", "content": [{"type": "thinking", "thinking": "Let me see.", "signature": ""},
                                                            {"type": "text", "text": "Because."}]},
                          {"role": "user", "content": "Sure?"}]
    counted = thinking.claude.messages.count_tokens(model=MODEL, messages=history)
    tokenized = httpx.post(thinking.url + "/tokenize", headers={"Authorization": "Bearer key-a"}, json={
        "model": MODEL, "messages": [{"role": "user", "content": "Why?"},
                                     {"role": "assistant", "content": "Because.", "reasoning_content": "Let me see."},
                                     {"role": "user", "content": "Sure?"}]}).json()
    assert counted.input_tokens == tokenized["count"]
    thoughtless = [history[0], {"role": "assistant", "content": "Because."}, history[2]]
    assert thinking.claude.messages.count_tokens(model=MODEL, messages=thoughtless).input_tokens < counted.input_tokens


def test_errors_come_in_anthropics_shape(live: Live) -> None:
    def refused(status: int, body: Any, *words: str) -> None:
        r = httpx.post(live.url + "/v1/messages", json=body, headers={"x-api-key": "key-a"}, timeout=60)
        assert r.status_code == status, r.text
        error = r.json()
        assert error["type"] == "error" and error["error"]["type"] == \
            {400: "invalid_request_error", 404: "not_found_error"}[status], error
        assert all(w in error["error"]["message"] for w in words), error

    hi = [{"role": "user", "content": "hi"}]
    refused(400, {"model": MODEL, "messages": hi}, "max_tokens")
    refused(404, {"model": "claude-nonesuch", "max_tokens": 4, "messages": hi}, "claude-nonesuch")
    refused(400, {"model": MODEL, "max_tokens": 4, "messages": [{"role": "system", "content": "x"}]}, "messages[0].role")
    refused(400, {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}]}, "text only")
    refused(400, {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "tool_result", "content": "x"}]}]}, "messages[0].content[0].tool_use_id")
    refused(400, {"model": MODEL, "max_tokens": 4, "messages": hi, "tools": [{"type": "bash_20250124", "name": "bash"}]},
            "tools[0]")
    refused(400, {"model": MODEL, "max_tokens": 4, "messages": hi, "tools": TOOLS, "tool_choice": {"type": "some"}},
            "tool_choice.type")
    refused(400, {"model": MODEL, "max_tokens": 4, "messages": hi, "tools": [
        {"name": "f", "input_schema": {"type": "nonsense"}}]}, "tools[0].input_schema")  # its names, not chat's
    refused(400, {"model": MODEL, "max_tokens": 4, "messages": hi, "stop_sequences": [""]}, "stop_sequences")
    refused(400, {"model": MODEL, "max_tokens": 4, "messages": hi, "temperature": 1.5}, "temperature")  # 0..1
    with pytest.raises(anthropic.BadRequestError, match=r"tools\[0\]\.input_schema"):  # counting names them so too
        live.claude.messages.count_tokens(model=MODEL, messages=hi, tools=[{"name": "f", "input_schema": {
            "type": "nonsense"}}])
    refused(400, {"model": MODEL, "max_tokens": 4, "messages": hi + [{"role": "assistant", "content": [
        {"type": "tool_use", "id": "t1", "name": "get_weather", "input": {}}]}]}, "final assistant message")
    refused(400, {"model": MODEL, "max_tokens": 0, "messages": hi}, "max_tokens")
    refused(400, {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "word " * 1100}]},
            "maximum context length")  # the prompt alone past the context
    with pytest.raises(anthropic.AuthenticationError) as denied:
        anthropic.Anthropic(base_url=live.url, api_key="wrong", max_retries=0).messages.create(
            model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    assert denied.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]


def test_a_max_tokens_past_the_context_stops_at_the_context_window(live: Live) -> None:
    """max_tokens is a cap (Claude Code asks for 32,000 whatever the model): past the context's room the reply
    runs until the context is full and stops with model_context_window_exceeded, whole and streamed, where
    chat completions answer 400 (as vLLM's do); a reply that ends first ends as usual."""
    long = [{"role": "user", "content": "word " * 480}]
    room = 1024 - live.claude.messages.count_tokens(model=MODEL, messages=long).input_tokens
    assert 0 < room < 100
    greedy = {"temperature": 0.0, "top_k": 1}
    whole = live.claude.messages.create(model=MODEL, max_tokens=32000, messages=long, extra_body=greedy)
    assert whole.stop_reason == "model_context_window_exceeded" and whole.usage.output_tokens == room
    with live.claude.messages.stream(model=MODEL, max_tokens=32000, messages=long, extra_body=greedy) as stream:
        streamed = stream.get_final_message()
    assert streamed.stop_reason == "model_context_window_exceeded"
    assert [b.text for b in streamed.content if b.type == "text"] == [b.text for b in whole.content if b.type == "text"]
    # A max_tokens inside the room stops at it, as max_tokens; chat completions refuse the larger one.
    short = live.claude.messages.create(model=MODEL, max_tokens=room - 1, messages=long, extra_body=greedy)
    assert short.stop_reason == "max_tokens" and short.usage.output_tokens == room - 1
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        live.chat.chat.completions.create(model=MODEL, max_tokens=32000, messages=long)


def test_models_in_anthropics_shape_for_its_clients(live: Live) -> None:
    listed = live.claude.models.list()
    assert [(m.id, m.type, m.display_name) for m in listed.data] == [(MODEL, "model", MODEL)]
    assert listed.data[0].created_at.year >= 2024 and listed.data[0].max_input_tokens == 1024
    assert live.claude.models.retrieve(MODEL).type == "model"
    assert listed.data[0].lifecycle == "active"  # a field the client's ModelInfo requires
    with pytest.raises(anthropic.NotFoundError) as missing:
        live.claude.models.retrieve("claude-nonesuch")
    assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]  # Anthropic's shape
    assert [m.id for m in live.chat.models.list().data] == [MODEL]  # OpenAI's clients: OpenAI's list
    assert httpx.get(live.url + "/v1/models", headers={"x-api-key": "key-a"}).json()["object"] == "list"


def test_litellm_anthropic_provider(live: Live, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network: its bundled price map
    litellm = pytest.importorskip("litellm", reason="litellm is not installed (pip install -e '.[dev]')")
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    reply = litellm.completion(model=f"anthropic/{MODEL}", api_base=live.url, api_key="key-a", messages=messages,
                               max_tokens=12, temperature=0)
    direct = live.claude.messages.create(model=MODEL, max_tokens=12, messages=messages, extra_body=GREEDY)
    assert reply.choices[0].message.content == direct.content[0].text
    called = litellm.completion(model=f"anthropic/{MODEL}", api_base=live.url, api_key="key-a", messages=messages,
                                max_tokens=64, temperature=0, tools=CHAT_TOOLS, tool_choice="required")
    calls = called.choices[0].message.tool_calls
    assert calls and all(json.loads(c.function.arguments)["city"] in ("Paris", "Rome") for c in calls)


def test_consecutive_same_role_messages_are_one_turn(live: Live) -> None:
    """Anthropic: "Consecutive user or assistant turns in your request will be combined into a single turn" (they
    rendered as two turns; a prefill split over two assistant messages closed the first)."""
    def tokens(messages: list[Any]) -> int:
        return live.claude.messages.count_tokens(model=MODEL, messages=messages).input_tokens

    assert tokens([{"role": "user", "content": "Hello"}, {"role": "user", "content": "World"}]) == \
        tokens([{"role": "user", "content": "Hello\nWorld"}])
    ask = {"role": "user", "content": "Where?"}
    split = live.claude.messages.create(model=MODEL, max_tokens=6, extra_body=GREEDY, messages=[
        ask, {"role": "assistant", "content": "The city"}, {"role": "assistant", "content": " is"}])
    joined = live.claude.messages.create(model=MODEL, max_tokens=6, extra_body=GREEDY, messages=[
        ask, {"role": "assistant", "content": "The city is"}])
    assert split.content[0].text == joined.content[0].text and split.usage.input_tokens == joined.usage.input_tokens
