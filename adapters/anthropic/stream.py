"""A chat completion stream (adapters/openai/chat.py's server-sent chunks) as the Messages API's events:
message_start (with the prompt's usage), ping, then one content block at a time (content_block_start, its
deltas: thinking_delta, text_delta, input_json_delta for a tool call's arguments, content_block_stop),
message_delta (stop_reason, stop_sequence, the output's usage) and message_stop. A failure after the
stream began is an `error` event, as Anthropic sends it."""

from __future__ import annotations

import contextlib
import json
from typing import Any, AsyncGenerator, AsyncIterator, Optional

from agentserve.adapters.anthropic.replies import anthropic_usage, message_id, stop_reason


def event(kind: str, data: dict[str, Any]) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n"


class _Blocks:
    """The content block being streamed: its index and kind ("thinking", "text", or the tool call's index)."""

    def __init__(self) -> None:
        self.index = -1
        self.kind: Optional[Any] = None

    def switch(self, kind: Any, start: dict[str, Any]) -> list[str]:
        """Events that close the open block (if another) and open one of `kind`."""
        if kind == self.kind:
            return []
        out = self.close()
        self.index += 1
        self.kind = kind
        return out + [event("content_block_start", {"index": self.index, "content_block": start})]

    def delta(self, delta: dict[str, Any]) -> str:
        return event("content_block_delta", {"index": self.index, "delta": delta})

    def close(self) -> list[str]:
        if self.kind is None:
            return []
        self.kind = None
        return [event("content_block_stop", {"index": self.index})]


def _delta_events(blocks: _Blocks, delta: dict[str, Any]) -> list[str]:
    out: list[str] = []
    if delta.get("reasoning_content"):
        out += blocks.switch("thinking", {"type": "thinking", "thinking": "", "signature": ""})
        out.append(blocks.delta({"type": "thinking_delta", "thinking": delta["reasoning_content"]}))
    if delta.get("content"):
        out += blocks.switch("text", {"type": "text", "text": ""})
        out.append(blocks.delta({"type": "text_delta", "text": delta["content"]}))
    for call in delta.get("tool_calls") or []:
        function = call.get("function") or {}
        out += blocks.switch(("tool", call["index"]), {"type": "tool_use", "id": call.get("id"),
                                                       "name": function.get("name"), "input": {}})
        if function.get("arguments"):
            out.append(blocks.delta({"type": "input_json_delta", "partial_json": function["arguments"]}))
    return out


async def message_events(chunks: AsyncGenerator[str, None], model: str, max_tokens: int) -> AsyncIterator[str]:
    blocks = _Blocks()
    started = False
    usage: Optional[dict[str, Any]] = None
    finish: tuple[Optional[str], Any] = (None, None)  # the chat finish_reason and stop_reason
    has_calls = False
    async with contextlib.aclosing(chunks) as it:  # a client that leaves closes the chat stream (and its request)
        async for sse in it:
            payload = sse.removeprefix("data: ").strip()
            if payload == "[DONE]":
                break
            chunk = json.loads(payload)
            if "error" in chunk:  # the chat stream's own failure event (OpenAI's error types)
                error = chunk["error"]
                kind = error.get("type")
                kind = kind if kind in ("invalid_request_error", "rate_limit_error") else "api_error"
                yield event("error", {"error": {"type": kind, "message": error.get("message", "")}})
                return
            usage = chunk.get("usage") or usage
            if not started and usage is not None:
                started = True
                start_usage = {**anthropic_usage(usage), "output_tokens": 0}
                yield event("message_start", {"message": {
                    "id": message_id(chunk["id"]), "type": "message", "role": "assistant", "model": model, "content": [],
                    "stop_reason": None, "stop_sequence": None, "usage": start_usage}})
                yield event("ping", {})
            for choice in chunk.get("choices") or []:
                has_calls = has_calls or bool((choice.get("delta") or {}).get("tool_calls"))
                for out in _delta_events(blocks, choice.get("delta") or {}):
                    yield out
                if choice.get("finish_reason") is not None:
                    finish = (choice["finish_reason"], choice.get("stop_reason"))
    for out in blocks.close():
        yield out
    output_tokens = usage["completion_tokens"] if usage is not None else 0
    reason, sequence = stop_reason(*finish, output_tokens, max_tokens, has_calls)
    yield event("message_delta", {"delta": {"stop_reason": reason, "stop_sequence": sequence},
                                  "usage": {"output_tokens": output_tokens}})
    yield event("message_stop", {})
