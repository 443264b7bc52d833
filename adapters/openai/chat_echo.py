"""A chat reply's role and vLLM's chat `echo`. The role is the server's --response-role (vLLM's flag,
"assistant" by default) when the prompt ends with a generation prompt; without one the reply continues
the last message, in that message's role. With `echo`, a reply that continues the conversation's last
message (continue_final_message, or any last message of the reply's role) starts with that message's
text, so the client gets the whole message; as in vLLM, only a last message of the reply's role is
echoed."""

from __future__ import annotations

from typing import Any


def reply_role(messages: list[dict[str, Any]], add_generation_prompt: bool, response_role: str) -> str:
    """The role of the reply's message (and of its stream's first delta)."""
    if add_generation_prompt or not messages or not messages[-1].get("role"):
        return response_role
    return str(messages[-1]["role"])


def echo_prefix(messages: list[dict[str, Any]], echo: bool, role: str) -> str:
    """The text an echoing reply of `role` starts with ("" when it echoes nothing); `messages`
    normalized (chat.messages.normalize_messages: content is text or None)."""
    if not echo or not messages or messages[-1].get("role") != role:
        return ""
    return messages[-1].get("content") or ""
