"""What GetSession shows for a committed reply: the message as TurnDone gives it (tool calls parsed out, the
thinking apart), worked out at the commit on the step thread from the whole output.

The turn's task parses the reply as it streams and records TurnDone's message when it reads the last output,
which comes after the commit: a client that cancelled in between (a deadline after the engine finished, the
turn kept whole) or a fork taken in between left the history showing the model's raw call text with no
tool_calls. The task's later record, when it comes, replaces this one with TurnDone's own message (the same
reply; its call ids are the ones the client saw)."""

from __future__ import annotations

from typing import Any, Collection, Optional

from agentserve.chat.reasoning import ReplyReasoning
from agentserve.chat.reply import ReplyStream, content_beside_calls, tool_format_of
from agentserve.grammar.reasoning import ReasoningMarkers
from agentserve.outputs import CompletionOutput, RequestOutput
from agentserve.sessions.types import PendingTurn


def shown_reply(tokenizer: Any, pending: PendingTurn, comp: CompletionOutput, history_msg: dict[str, Any],
                tools: Optional[list[dict[str, Any]]], eos_token_ids: Collection[int],
                reasoning: Optional[ReasoningMarkers]) -> Optional[dict[str, Any]]:
    """The reply as shown, or None when it is shown as the history keeps it (no tools parsed, no reasoning)."""
    # Decided as ReplyStream decides, before building one (its detokenizer decodes the prompt's tail).
    parses_tools = bool(tools) and pending.params.tool_choice != "none" and tool_format_of(tokenizer) is not None
    if not parses_tools and reasoning is None:
        return None
    shown = dict(history_msg)
    content = comp.text or ""
    if parses_tools:
        stream = ReplyStream(tokenizer, pending.prompt_token_ids, pending.params, tools, eos_token_ids, reasoning)
        ids = list(comp.token_ids)
        whole = CompletionOutput(comp.index, comp.text, ids, None, None, comp.finish_reason, comp.stop_reason,
                                 comp.text, ids)
        stream.feed(RequestOutput(pending.request_id, None, pending.prompt_token_ids, [whole], True))
        parsed, calls = stream.final()
        content = parsed if parsed is not None else content
        if calls:
            shown["tool_calls"] = calls
    if reasoning is not None:
        thinking, answer = ReplyReasoning(reasoning, pending.prompt_token_ids).split(content)
        shown.update(content=content_beside_calls(answer, "tool_calls" in shown), reasoning_content=thinking)
    else:
        shown["content"] = content_beside_calls(content, "tool_calls" in shown)
    return shown
