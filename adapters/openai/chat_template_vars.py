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


# apply_chat_template's arguments that change what it returns rather than what the template sees: never a request's.
_NOT_VARIABLES = frozenset(("self", "conversation", "messages", "tokenize", "padding", "truncation", "max_length",
                            "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"))


def apply_template_overrides(req: ChatCompletionRequest) -> None:
    """vLLM lays chat_template_kwargs over its own arguments to the template: `add_generation_prompt` and
    `continue_final_message` given there are the request's (its checks, reply role and echo follow them);
    `tools` there is what the template shows (the reply's calls are parsed against the request's tools)."""
    kwargs = dict(req.chat_template_kwargs or {})
    refused = sorted(_NOT_VARIABLES & kwargs.keys())
    if refused:
        key = refused[0]
        raise OpenAIError(400, f"chat_template_kwargs.{key}: an argument of apply_chat_template that changes what it "
                               "returns, not a template variable; remove it", param=f"chat_template_kwargs.{key}")
    for key in ("add_generation_prompt", "continue_final_message"):
        if key in kwargs:
            value = kwargs.pop(key)
            if not isinstance(value, bool):
                raise OpenAIError(400, f"chat_template_kwargs.{key} must be true or false",
                                  param=f"chat_template_kwargs.{key}")
            setattr(req, key, value)
    if req.chat_template_kwargs is not None:
        req.chat_template_kwargs = kwargs


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
