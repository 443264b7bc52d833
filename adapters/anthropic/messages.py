"""POST /v1/messages and POST /v1/messages/count_tokens: a message request runs as the chat completion it means
(convert.py) through the chat endpoint, and its reply is written back as Anthropic's message (replies.py), or
its stream as Anthropic's events (stream.py)."""

from __future__ import annotations

import re
from typing import Any, Awaitable, TypeVar

from pydantic import ValidationError

from agentserve.adapters.anthropic.convert import chat_generation_fields, chat_request_fields
from agentserve.adapters.anthropic.protocol import CountTokensRequest, MessagesRequest
from agentserve.adapters.anthropic.replies import message_body
from agentserve.adapters.anthropic.stream import message_events
from agentserve.adapters.openai.chat import ChatEndpoint
from agentserve.adapters.openai.protocol import ChatCompletionRequest, OpenAIError
from agentserve.chat import limits as L
from agentserve.errors import FieldError

T = TypeVar("T")
# The chat request's field names in the chat endpoint's errors -> the message request's.
_FIELD_NAMES = [(re.compile(r"tools\[(\d+)\]\.function\.parameters"), r"tools[\1].input_schema"),
                (re.compile(r"tools\[(\d+)\]\.function\.name"), r"tools[\1].name"),
                (re.compile(r"response_format\.json_schema\.schema"), "output_config.format.schema"),
                (re.compile(r"^stop strings\b"), "stop_sequences")]


def _in_message_terms(e: OpenAIError) -> OpenAIError:
    for pattern, name in _FIELD_NAMES:
        e.message = pattern.sub(name, e.message)
        e.param = pattern.sub(name, e.param) if e.param else e.param
    if e.param == "stop":
        e.param = "stop_sequences"
    return e


async def _named_for_messages(call: Awaitable[T]) -> T:
    """The chat endpoint's answer; its errors name the message request's fields."""
    try:
        return await call
    except OpenAIError as e:
        raise _in_message_terms(e) from None
    except FieldError as e:  # the chat checks' own errors (tool schemas, lengths)
        raise _in_message_terms(OpenAIError(400, str(e), param=e.field, code=e.code)) from None


class MessagesEndpoint:
    def __init__(self, chat: ChatEndpoint) -> None:
        self.chat = chat

    @staticmethod
    def _chat_request(fields: dict[str, Any]) -> ChatCompletionRequest:
        try:
            return ChatCompletionRequest(**fields)
        except ValidationError as e:  # a value convert.py passed on unchecked (a number out of range, ...)
            first = e.errors()[0]
            field = ".".join(str(p) for p in first["loc"])
            raise OpenAIError(400, f"{field}: {first['msg']}", param=field) from None

    async def create(self, req: MessagesRequest, raw_request: Any) -> Any:
        generation = chat_generation_fields(req)
        if self.chat.s.engine.reasoning is None:
            # No reasoning parser, so no markers to end the reasoning at: the budget cannot apply (and a client
            # that always sends one, as Claude Code does with thinking on, is still served).
            generation.pop("thinking_token_budget", None)
        chat_req = self._chat_request({**chat_request_fields(req), **generation})
        # max_tokens is a cap, not a demand: past the context's room the reply stops at the context window
        # (model_context_window_exceeded), as Anthropic's newer models do, rather than refusing Claude Code's 32000.
        result = await _named_for_messages(self.chat.create(chat_req, raw_request, fit_to_context=True))
        if isinstance(result, dict):
            return message_body(result, req.model, req.max_tokens)
        return message_events(result, req.model, req.max_tokens)

    async def count_tokens(self, req: CountTokensRequest) -> dict[str, Any]:
        L.check_utf8(req.model_dump(exclude_none=True), "")  # as create's chat checks do, in this API's names
        return {"input_tokens": len(await _named_for_messages(self._prompt(req)))}

    async def _prompt(self, req: CountTokensRequest) -> list[int]:
        """The prompt a message request renders to, checked as the chat endpoint checks a request."""
        chat_req = self._chat_request(chat_request_fields(req))
        self.chat.s.resolve_model(chat_req.model)  # 404 for a model or adapter that is not served
        messages, tools, _, kwargs = self.chat.prepare_prompt(chat_req)
        return await self.chat.render_prompt(chat_req, messages, tools, kwargs)
