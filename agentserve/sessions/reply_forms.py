"""The forms a turn's reply takes in a session: the history form (what the chat template renders again on
the next turn) and the shown form (what GetSession returns, as TurnDone showed it).

At commit the history keeps the model's own text, special tokens spelled out, so that an append-consistent
template re-renders it as generated and the next turn only appends. Once the reply is parsed, one with tool
calls enters the history in the structured form a client sends back to a stateless API: the template
re-serialises the calls (`{"name": "f", "arguments": ...}` where the model wrote its own spacing), so the
next turn re-renders from scratch and keeps the pages of the common prefix, and the session stays
token-equal to rendering the conversation GetSession shows (and to a stateless request over it)."""

from __future__ import annotations

import contextlib
from typing import Any, Optional

from agentserve.chat import render as R
from agentserve.chat.messages import SESSION_RULES, normalize_messages
from agentserve.errors import FieldError
from agentserve.outputs import CompletionOutput
from agentserve.sessions.types import PendingTurn, TurnResult


def committed_reply(tokenizer: Any, comp: CompletionOutput, pending: PendingTurn, eos_token_ids: Any,
                    raw_tokens: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the reply as the session's history keeps it at commit, the reply as the client sees it)."""
    ids = list(comp.token_ids)
    if raw_tokens:
        return {"role": "assistant", "token_ids": ids}, {"role": "assistant", "content": comp.text or ""}
    # History: the model's own text with special tokens spelled out (so the template re-renders
    # it as generated), minus a final stop token, which the template writes as its end marker.
    if comp.ends_on_stop_token(eos_token_ids):
        ids = ids[:-1]
    raw_text = R.decode_continuation(tokenizer, pending.prompt_token_ids, ids)
    prefix = pending.content_prefix
    if prefix and raw_text.startswith(prefix):
        raw_text = raw_text[len(prefix):]  # the template writes it back (Llama 2's ' ' after [/INST])
    return {"role": "assistant", "content": raw_text or ""}, {"role": "assistant", "content": comp.text or ""}


def parsed_reply(result: TurnResult) -> tuple[dict[str, Any], Optional[dict[str, Any]]]:
    """(the shown form: TurnDone's message, tool calls parsed out and the thinking apart; the history form
    that replaces the committed one, None to keep the model's text). Calls whose arguments are not a JSON
    object (an unconstrained reply) keep the model's text, which a client could not send back either."""
    shown = dict(result.message)
    if result.parts is not None:
        shown.update(content=result.parts.content, reasoning_content=result.parts.reasoning)
    history: Optional[dict[str, Any]] = None
    if "tool_calls" in shown:
        with contextlib.suppress(FieldError):  # as a stateless request's history takes it: arguments as objects
            history = normalize_messages([shown], SESSION_RULES)[0]
    return shown, history
