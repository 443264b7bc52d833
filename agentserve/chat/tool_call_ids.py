"""Tool-call ids in the shape the chat template accepts.

Mistral's chat templates (every one that writes `[TOOL_CALLS]`) raise unless each id of an assistant's
tool calls, and each tool message's `tool_call_id`, is 9 characters long ("Tool call IDs should be
alphanumeric strings with length 9!"). The ids this server hands out for those models already are, but a
conversation's history can carry other ids: OpenAI's `call_...`, Anthropic's `toolu_...`, ids an agent
framework made up, a conversation begun on another model. vLLM's Mistral tokenizer mode cuts such ids to
their last 9 characters; here each one that does not fit becomes a 9-character alphanumeric digest of
itself, so that it stays distinct from every other id (cut ids can collide), pairs the call with its
result as before, and renders the same on every request (the prefix cache and a session's earlier turns
still match). Ids that fit are kept as they are. Other templates take any id and get the messages as
they came.
"""

from __future__ import annotations

import hashlib
import string
from typing import Any, Sequence, Union

from agentserve.grammar.tool_formats import detect_tool_format

Message = dict[str, Any]

MISTRAL_ID_LENGTH = 9
_ALPHABET = string.ascii_letters + string.digits


def template_wants_short_ids(chat_template: Union[None, str, dict, Sequence[Any]]) -> bool:
    """Whether the template renders Mistral's tool calls (and so checks the ids' length)."""
    return chat_template is not None and detect_tool_format(chat_template) in ("mistral", "mistral_v11")


def fitted_id(call_id: str) -> str:
    """`call_id` if it is already 9 alphanumeric characters, else a 9-character digest of it."""
    if len(call_id) == MISTRAL_ID_LENGTH and all(c in _ALPHABET for c in call_id):
        return call_id
    value = int.from_bytes(hashlib.sha256(call_id.encode("utf-8", "surrogatepass")).digest()[:8], "big")
    chars = []
    for _ in range(MISTRAL_ID_LENGTH):  # 62^9 ids: a collision between a conversation's ids is negligible
        value, digit = divmod(value, len(_ALPHABET))
        chars.append(_ALPHABET[digit])
    return "".join(chars)


def _fit_calls(calls: Any) -> Any:
    if not isinstance(calls, list):
        return calls
    return [{**c, "id": fitted_id(c["id"])} if isinstance(c, dict) and isinstance(c.get("id"), str) else c
            for c in calls]


def fit_tool_call_ids(messages: Sequence[Message]) -> list[Message]:
    """The messages with every tool-call id (assistant `tool_calls[].id`, tool `tool_call_id`) fitted."""
    out: list[Message] = []
    for m in messages:
        if isinstance(m, dict) and isinstance(m.get("tool_call_id"), str):
            m = {**m, "tool_call_id": fitted_id(m["tool_call_id"])}
        if isinstance(m, dict) and m.get("tool_calls"):
            m = {**m, "tool_calls": _fit_calls(m["tool_calls"])}
        out.append(m)
    return out
