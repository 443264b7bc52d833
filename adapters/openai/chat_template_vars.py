"""What a chat completion hands the chat template besides its messages and tools: `chat_template_kwargs`,
OpenAI's `reasoning_effort` (as vLLM hands it over: chat/template_kwargs.py), `continue_final_message`,
`documents`, and a client's own template (`chat_template`, or `chat_template_kwargs.chat_template`), which
only a server started with --trust-request-chat-template takes: a template is a program, and a few bytes
of Jinja can expand to megabytes."""

from __future__ import annotations

from typing import Any

from agentserve.adapters.openai.protocol import ChatCompletionRequest, OpenAIError
from agentserve.chat.template_kwargs import with_reasoning_effort
from agentserve.errors import FieldError


def chat_template_variables(req: ChatCompletionRequest, trust_request_chat_template: bool) -> dict[str, Any]:
    try:
        kwargs = with_reasoning_effort(dict(req.chat_template_kwargs or {}), req.reasoning_effort, "reasoning_effort")
    except FieldError as e:
        raise OpenAIError(400, str(e), param=e.field) from None
    template = kwargs.pop("chat_template", None)
    field = "chat_template_kwargs.chat_template"
    if req.chat_template is not None:
        template, field = req.chat_template, "chat_template"
    if template is not None:
        if not trust_request_chat_template:
            raise OpenAIError(400, f"{field}: this server does not accept chat templates in requests (start "
                                   "it with --trust-request-chat-template to allow them)", param=field)
        if not isinstance(template, str):
            raise OpenAIError(400, f"{field} must be a string", param=field)
        kwargs["chat_template"] = template
    if req.continue_final_message:
        kwargs["continue_final_message"] = True
    if req.documents is not None:  # apply_chat_template's own argument, as vLLM passes it
        kwargs["documents"] = req.documents
    return kwargs
