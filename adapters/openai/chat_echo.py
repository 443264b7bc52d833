"""vLLM's chat `echo`: a reply that continues the conversation's last message (continue_final_message,
or any last assistant message) starts with that message's text, so the client gets the whole message.
Only a last message of the reply's own role (assistant) is echoed, as in vLLM."""

from __future__ import annotations

from typing import Any


def echo_prefix(messages: list[dict[str, Any]], echo: bool) -> str:
    """The text an echoing reply starts with ("" when it echoes nothing); `messages` normalized
    (chat.messages.normalize_messages: content is text or None)."""
    if not echo or not messages or messages[-1].get("role") != "assistant":
        return ""
    return messages[-1].get("content") or ""
