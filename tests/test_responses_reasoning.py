"""The Responses API on a thinking model (--reasoning-parser qwen3): the reply's reasoning is a `reasoning`
output item of its own (reasoning_text content; streamed as response.reasoning_text events), the message
holds the answer only, usage counts reasoning_tokens, and reasoning items given back as input become the
reasoning_content of the assistant message they precede (what the OpenAI Agents SDK sends when it keeps the
conversation itself)."""

from __future__ import annotations

import json
from typing import Any

import httpx
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from agentserve.adapters.openai.responses_events import ResponseEvents
from agentserve.adapters.openai.responses_items import input_messages, normalize_input, output_items
from agentserve.llm import LLM
from agentserve.sessions.types import ReplyParts
from agentserve.testing import tiny_model_cached
from helpers.live_server import live_openai

ARCH = "qwen3"


def _events(chunks: list[str]) -> list[dict[str, Any]]:
    return [json.loads(line[len("data: "):]) for chunk in chunks for line in chunk.splitlines()
            if line.startswith("data: ")]


def test_live_reasoning_is_an_item_of_its_own_whole_and_streamed() -> None:
    # A random-weight model rarely closes its <think> block: the reply is all reasoning, cut at the limit.
    with live_openai(ARCH, max_model_len=512, reasoning_parser="qwen3") as client:
        http = httpx.Client(base_url=str(client.base_url).removesuffix("v1/"), timeout=60)
        body = {"model": "m", "input": "Is it?", "max_output_tokens": 12, "temperature": 0}
        whole = http.post("/v1/responses", json=body)
        assert whole.status_code == 200, whole.text
        resp = Response.model_validate(whole.json())
        kinds = [item.type for item in resp.output]
        assert kinds and kinds[0] == "reasoning" and kinds.count("reasoning") == 1
        thought = resp.output[0].content[0].text
        assert thought and "<think>" not in thought and "</think>" not in thought
        assert "<think>" not in resp.output_text and thought not in resp.output_text
        assert 0 < resp.usage.output_tokens_details.reasoning_tokens <= resp.usage.output_tokens
        with http.stream("POST", "/v1/responses", json=dict(body, stream=True)) as s:
            events = [json.loads(line[len("data: "):]) for line in s.iter_lines() if line.startswith("data: ")]
        for event in events:
            TypeAdapter(ResponseStreamEvent).validate_python(event)
        streamed = "".join(e["delta"] for e in events if e["type"] == "response.reasoning_text.delta")
        assert streamed == thought  # greedy: the same reply as the whole response's
        final = events[-1]["response"]
        assert final["output"][0]["type"] == "reasoning" and final["output"][0]["content"][0]["text"] == thought
        assert not any(e["type"] == "response.output_text.delta" and "<think>" in e["delta"] for e in events)
        # include_reasoning false (vLLM's): the thinking is generated and counted, but left out of the output.
        hidden_body = dict(body, include_reasoning=False)
        hidden = Response.model_validate(http.post("/v1/responses", json=hidden_body).json())
        assert [item.type for item in hidden.output if item.type == "reasoning"] == []
        assert hidden.usage.output_tokens_details.reasoning_tokens == resp.usage.output_tokens_details.reasoning_tokens
        with http.stream("POST", "/v1/responses", json=dict(hidden_body, stream=True)) as s:
            hidden_events = [json.loads(line[len("data: "):]) for line in s.iter_lines() if line.startswith("data: ")]
        assert not any(e["type"].startswith("response.reasoning_text") for e in hidden_events)
        assert not any(item["type"] == "reasoning" for item in hidden_events[-1]["response"]["output"])
        # The output given back as input (a client keeping the conversation itself) is accepted.
        again = http.post("/v1/responses", json=dict(body, input=[{"role": "user", "content": "Is it?"},
                                                                  *whole.json()["output"],
                                                                  {"role": "user", "content": "Sure?"}]))
        assert again.status_code == 200, again.text
        http.close()


def test_output_items_and_events_split_reasoning_from_the_answer() -> None:
    parts = ReplyParts(reasoning="let me see", content="yes")
    items = output_items({"role": "assistant", "content": "<think>let me see</think>yes"}, "completed", parts)
    assert [i["type"] for i in items] == ["reasoning", "message"]
    assert items[0]["content"] == [{"type": "reasoning_text", "text": "let me see"}]
    assert items[1]["content"][0]["text"] == "yes"
    writer = ResponseEvents({"id": "r", "status": "in_progress", "output": []})
    chunks = writer.start() + writer.reasoning("let ") + writer.reasoning("me see") + writer.text("yes")
    chunks += writer.finish({"id": "r", "status": "completed"})
    kinds = [e["type"] for e in _events(chunks)]
    # The reasoning item is closed before the message opens, each with its own content part.
    assert kinds.index("response.reasoning_text.done") < kinds.index("response.output_text.delta")
    assert [e["delta"] for e in _events(chunks) if e["type"] == "response.reasoning_text.delta"] == ["let ", "me see"]
    assert [i["type"] for i in writer.output] == ["reasoning", "message"]


def test_reasoning_input_items_become_the_next_assistant_messages_reasoning() -> None:
    items = normalize_input([
        {"role": "user", "content": "Weather?"},
        {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "use the tool"}]},
        {"type": "function_call", "call_id": "c1", "name": "weather", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"type": "reasoning", "id": "rs_2", "summary": [{"type": "summary_text", "text": "answer now"}]},
        {"role": "assistant", "content": "It is sunny."},
        {"type": "reasoning", "id": "rs_3", "summary": [], "encrypted_content": "opaque"},  # nothing readable
        {"role": "user", "content": "Thanks"}])
    messages = input_messages(items)
    assert messages[1] == {"role": "assistant", "content": None, "reasoning_content": "use the tool",
                           "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "weather",
                                                                                        "arguments": "{}"}}]}
    assert messages[3] == {"role": "assistant", "content": "It is sunny.", "reasoning_content": "answer now"}
    assert messages[4] == {"role": "user", "content": "Thanks"}


def test_reasoning_tokens_count_the_block_and_its_markers() -> None:
    llm = LLM(str(tiny_model_cached(ARCH)), device="cpu", dtype="float32", reasoning_parser="qwen3")
    markers = llm.engine.reasoning
    assert markers is not None
    s, e = markers.start_id, markers.end_id
    assert markers.reasoning_tokens([1, 2], [s, 5, 6, e, 7]) == 4  # the prompt left it open: thinking from the start
    assert markers.reasoning_tokens([1, s, e], [7, 8]) == 0          # thinking off (an empty block in the prompt)
    assert markers.reasoning_tokens([1, s, e], [s, 5, e, 9]) == 3    # a block the reply opens itself
    llm.close()
