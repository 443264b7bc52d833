"""Anthropic's shapes of a chat reply: the message (content blocks: thinking, text, tool_use with the parsed
input), its stop_reason (end_turn, max_tokens, model_context_window_exceeded, stop_sequence, tool_use) and usage
in Anthropic's terms: input_tokens are the prompt tokens the prefix cache did not hold, cache_read_input_tokens
those it did (their sum is the prompt)."""

from __future__ import annotations

import json
from typing import Any, Optional


def message_id(chat_id: str) -> str:
    return "msg_" + chat_id.removeprefix("chatcmpl-")


def stop_reason(finish_reason: Optional[str], matched: Any, output_tokens: int,
                max_tokens: int, has_calls: bool = False) -> tuple[Optional[str], Optional[str]]:
    """(Anthropic's stop_reason, the stop sequence that ended the reply) from the chat finish: `matched` is
    the stop string that matched (vLLM's stop_reason), or a stop token's id, or None at the end of turn.
    A length finish short of the request's max_tokens filled the context (its max_tokens was lowered to the
    room left): model_context_window_exceeded, as Anthropic's API reports it. A reply of tool calls that stopped
    on its own is tool_use, a forced tool's too (the chat finish says "stop" there, as OpenAI's does)."""
    if finish_reason == "length":
        return ("model_context_window_exceeded" if output_tokens < max_tokens else "max_tokens"), None
    if finish_reason == "tool_calls":
        return "tool_use", None
    if finish_reason == "stop" and isinstance(matched, str):
        return "stop_sequence", matched
    if finish_reason == "stop" and has_calls:
        return "tool_use", None
    if finish_reason is None:
        return None, None
    return "end_turn", None


def anthropic_usage(usage: dict[str, Any]) -> dict[str, Any]:
    cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    return {"input_tokens": usage["prompt_tokens"] - cached, "output_tokens": usage["completion_tokens"],
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached}


def tool_input(arguments: str) -> dict[str, Any]:
    """A call's arguments as tool_use's input object. Calls are constrained to their tool's schema, so only a call
    that max_tokens cut off is no object: its input is then empty (stop_reason max_tokens says it is unfinished)."""
    try:
        value = json.loads(arguments or "{}")
    except json.JSONDecodeError:
        value = None
    return value if isinstance(value, dict) else {}


def content_blocks(message: dict[str, Any]) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    if message.get("reasoning_content"):
        blocks.append({"type": "thinking", "thinking": message["reasoning_content"], "signature": ""})
    if message.get("content"):
        blocks.append({"type": "text", "text": message["content"]})
    for call in message.get("tool_calls") or []:
        blocks.append({"type": "tool_use", "id": call["id"], "name": call["function"]["name"],
                       "input": tool_input(call["function"]["arguments"])})
    return blocks


def message_body(chat_body: dict[str, Any], model: str, max_tokens: int) -> dict[str, Any]:
    choice = chat_body["choices"][0]
    reason, sequence = stop_reason(choice["finish_reason"], choice.get("stop_reason"),
                                   chat_body["usage"]["completion_tokens"], max_tokens,
                                   bool(choice["message"].get("tool_calls")))
    return {"id": message_id(chat_body["id"]), "type": "message", "role": "assistant", "model": model,
            "content": content_blocks(choice["message"]), "stop_reason": reason, "stop_sequence": sequence,
            "usage": anthropic_usage(chat_body["usage"])}
