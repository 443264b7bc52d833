"""The Responses API's response object and its streamed events (the official event types):

    response.created, response.in_progress
    response.output_item.added / .done                (a reasoning, message or function_call item)
    response.content_part.added / .done               (the message's output_text part, the reasoning's
                                                       reasoning_text part)
    response.reasoning_text.delta / .done             (with a reasoning parser: the reply's reasoning)
    response.output_text.delta / .done
    response.function_call_arguments.delta / .done
    response.completed | response.incomplete           (the whole response, as retrieve returns it)

Every event carries `type` and a `sequence_number`; the SSE frames name the type as their `event`.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from agentserve.adapters.openai.responses_items import (ResponsesRequest, function_call_item, mark_cut_off,
                                                        message_item, new_id, reasoning_item)

Item = dict[str, Any]


def responses_usage(prompt_tokens: int, cached_tokens: int, completion_tokens: int,
                    reasoning_tokens: int = 0) -> dict[str, Any]:
    # The openai client's ResponseUsage requires cache_write_tokens (OpenAI's prompt-cache writes, which
    # it reports apart from reads); this server's prefix cache reports hits only: 0, as for any request.
    details = {"cached_tokens": cached_tokens, "cache_write_tokens": 0}
    return {"input_tokens": prompt_tokens, "input_tokens_details": details,
            "output_tokens": completion_tokens, "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
            "total_tokens": prompt_tokens + completion_tokens}


def response_body(response_id: str, req: ResponsesRequest, model: str, created_at: int, *, status: str,
                  output: list[Item], usage: Optional[dict[str, Any]] = None,
                  incomplete_reason: Optional[str] = None, top_logprobs: Optional[int] = None) -> dict[str, Any]:
    """The response object (what create returns, retrieve returns and the last event carries)."""
    text = req.text if req.text is not None else {"format": {"type": "text"}}
    return {
        "id": response_id, "object": "response", "created_at": created_at, "status": status, "error": None,
        "background": req.background is True,
        "incomplete_details": {"reason": incomplete_reason} if incomplete_reason else None,
        "instructions": req.instructions, "max_output_tokens": req.max_output_tokens, "model": model,
        "output": output, "parallel_tool_calls": req.parallel_tool_calls is not False,
        "previous_response_id": req.previous_response_id,
        "conversation": {"id": req.conversation if isinstance(req.conversation, str) else req.conversation.get("id")}
        if req.conversation is not None else None,
        "reasoning": {"effort": (req.reasoning or {}).get("effort"), "summary": (req.reasoning or {}).get("summary")},
        "store": req.store is not False, "temperature": 1.0 if req.temperature is None else req.temperature,
        "text": text, "tool_choice": req.tool_choice if req.tool_choice is not None else "auto",
        "tools": list(req.tools or []), "top_logprobs": top_logprobs,
        "top_p": 1.0 if req.top_p is None else req.top_p, "truncation": req.truncation or "disabled",
        "usage": usage, "user": req.user, "metadata": dict(req.metadata or {}),
    }


def sse_event(event: dict[str, Any]) -> str:
    return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False, separators=(',', ':'))}\n\n"


# The codes a failed Response's `error.code` may carry (OpenAI's ResponseError.code, less the image ones).
_RESPONSE_ERROR_CODES = frozenset(("server_error", "rate_limit_exceeded", "invalid_prompt", "vector_store_timeout"))


def response_error_code(status: int, code: Optional[str]) -> str:
    """An error's code as a failed Response's error.code: OpenAI's own where it is one, else the class its
    HTTP status says (context_length_exceeded and the like are an invalid prompt; the message keeps the detail)."""
    if code in _RESPONSE_ERROR_CODES:
        return code
    return "rate_limit_exceeded" if status == 429 else "server_error" if status >= 500 else "invalid_prompt"


class ResponseEvents:
    """The events of one streamed response, built from the turn's text and tool-call deltas; the
    output items it streamed are the final response's `output` (same ids, same text)."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body
        self.output: list[Item] = []
        self._seq = 0
        self._thought: Optional[Item] = None    # the reasoning item being streamed
        self._text: Optional[Item] = None       # the message item being streamed
        self._call: Optional[Item] = None       # the function_call item being streamed
        self._call_index = -1                   # the turn's index of that call

    def _event(self, type_: str, **fields: Any) -> str:
        event = {"type": type_, "sequence_number": self._seq, **fields}
        self._seq += 1
        return sse_event(event)

    def start(self, created_status: str = "in_progress") -> list[str]:
        """response.created (in_progress, or queued for a background response), then response.in_progress."""
        return [self.created(created_status),
                self._event("response.in_progress", response=dict(self.body, status="in_progress", output=[], usage=None))]

    def created(self, status: str) -> str:
        return self._event("response.created", response=dict(self.body, status=status, output=[], usage=None))

    def _open(self, item: Item) -> str:
        self.output.append(item)
        added = dict(item, status="in_progress")
        if item["type"] in ("message", "reasoning"):
            added["content"] = []
        return self._event("response.output_item.added", output_index=len(self.output) - 1, item=added)

    def _open_part(self, item: Item, empty_part: dict[str, Any]) -> list[str]:
        """A message or reasoning item opened with its one content part."""
        return [self._open(item), self._event("response.content_part.added", item_id=item["id"],
                                              output_index=len(self.output) - 1, content_index=0, part=empty_part)]

    def _part_delta(self, item: Item, type_: str, delta: str, **extra: Any) -> str:
        item["content"][0]["text"] += delta
        return self._event(type_, item_id=item["id"], output_index=len(self.output) - 1, content_index=0,
                           delta=delta, **extra)

    def reasoning(self, delta: str) -> list[str]:
        if not delta:
            return []
        events = self._close_text() + self._close_call()
        if self._thought is None:
            self._thought = reasoning_item(new_id("rs"), "")
            events += self._open_part(self._thought, {"type": "reasoning_text", "text": ""})
        events.append(self._part_delta(self._thought, "response.reasoning_text.delta", delta))
        return events

    def text(self, delta: str, logprobs: Optional[list[dict[str, Any]]] = None) -> list[str]:
        """`logprobs`: those of the delta's tokens (responses_logprobs.py), when the request asked."""
        if not delta:
            return []
        events = self._close_thought() + self._close_call()
        if self._text is None:
            self._text = message_item(new_id("msg"), "")
            events += self._open_part(self._text, {"type": "output_text", "text": "", "annotations": []})
        self._text["content"][0]["logprobs"] += logprobs or []
        events.append(self._part_delta(self._text, "response.output_text.delta", delta, logprobs=logprobs or []))
        return events

    def call(self, index: int, call_id: str, name: str, delta: str) -> list[str]:
        events = self._close_thought() + self._close_text()
        if index != self._call_index:
            events += self._close_call()
            self._call_index = index
            self._call = function_call_item(new_id("fc"), call_id, name, "")
            events.append(self._open(self._call))
        assert self._call is not None
        if delta:
            self._call["arguments"] += delta
            events.append(self._event("response.function_call_arguments.delta", item_id=self._call["id"],
                                      output_index=len(self.output) - 1, delta=delta))
        return events

    def _close_part(self, item: Optional[Item], type_: str, **extra: Any) -> list[str]:
        """A message or reasoning item's text done, its content part done, the item done."""
        if item is None:
            return []
        at = self.output.index(item)
        part = item["content"][0]
        return [self._event(type_, item_id=item["id"], output_index=at, content_index=0, text=part["text"], **extra),
                self._event("response.content_part.done", item_id=item["id"], output_index=at, content_index=0,
                            part=part),
                self._event("response.output_item.done", output_index=at, item=item)]

    def _close_text(self) -> list[str]:
        item, self._text = self._text, None
        return [] if item is None else self._close_part(item, "response.output_text.done",
                                                        logprobs=item["content"][0]["logprobs"])

    def _close_thought(self) -> list[str]:
        item, self._thought = self._thought, None
        return self._close_part(item, "response.reasoning_text.done")

    def _close_call(self) -> list[str]:
        item, self._call = self._call, None
        if item is None:
            return []
        at = self.output.index(item)
        return [self._event("response.function_call_arguments.done", item_id=item["id"], output_index=at,
                            name=item["name"], arguments=item["arguments"]),
                self._event("response.output_item.done", output_index=at, item=item)]

    def finish(self, final_body: dict[str, Any], trailing_logprobs: Optional[list[dict[str, Any]]] = None) -> list[str]:
        """Closes the open items; the last event carries the whole response (with these items).
        `trailing_logprobs`: the message's last tokens that added no text (the stop token)."""
        if self._text is not None and trailing_logprobs:
            self._text["content"][0]["logprobs"] += trailing_logprobs
        mark_cut_off(self.output, final_body["status"])  # before the items' done events carry them
        events = self._close_thought() + self._close_text() + self._close_call()
        self.body = dict(final_body, output=self.output)
        kind = "response.completed" if self.body["status"] == "completed" else "response.incomplete"
        events.append(self._event(kind, response=self.body))
        return events

    def failed(self, message: str, code: str) -> list[str]:
        """`code`: one of OpenAI's (response_error_code)."""
        self.body = dict(self.body, status="failed", output=self.output, error={"code": code, "message": message})
        return [self._event("response.failed", response=self.body)]
