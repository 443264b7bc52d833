"""Extra chat-template variables a session renders every turn with (vLLM's `chat_template_kwargs`, e.g.
Qwen3's `{"enable_thinking": false}` or `reasoning_effort`), checked once when the session is created
(and for gRPC Generate's messages, with the same rules).

They are template variables only: the names apply_chat_template takes for itself (the conversation,
the tools, the generation prompt, the template ...) are refused, since a session renders its history
with the model's own template, its own tools and its own generation prompt on every turn. Values must
be JSON (what the HTTP and gRPC APIs can carry, and what a stored response's key compares).
"""

from __future__ import annotations

import json
from typing import Any, Optional

from agentserve.errors import FieldError

FIELD = "chat_template_kwargs"
# apply_chat_template's own parameters (transformers; `self`: it is a bound method), and the template itself.
RESERVED = frozenset(("self", "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
                      "continue_final_message", "tokenize", "padding", "truncation", "max_length",
                      "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"))


def with_reasoning_effort(kwargs: dict[str, Any], effort: Any, field: str) -> dict[str, Any]:
    """OpenAI's reasoning effort as vLLM hands it to the template: `reasoning_effort`, and `enable_thinking`
    (false for "none": Qwen3's switch) unless the request's variables set them; templates ignore variables
    they do not read. `field`: the request field that carried the effort, for the error."""
    if effort is None:
        return kwargs
    if not isinstance(effort, str):
        raise FieldError(f"{field} must be a string (e.g. 'low', 'none'), got {effort!r}", field)
    out = dict(kwargs)
    out.setdefault("reasoning_effort", effort)
    out.setdefault("enable_thinking", effort != "none")
    return out


def checked_template_kwargs(kwargs: Optional[dict[str, Any]]) -> dict[str, Any]:
    """The variables, checked (a FieldError naming the key that is wrong); {} for none."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict):
        raise FieldError(f"{FIELD} must be a JSON object of template variables", FIELD)
    for key in kwargs:
        if not isinstance(key, str) or not key.isidentifier():
            raise FieldError(f"{FIELD}: {key!r} is not a template variable name", FIELD)
        if key in RESERVED:
            raise FieldError(f"{FIELD}.{key}: set by the session itself (the model's chat template, the session's "
                             "tools and conversation), not a template variable a request may set", f"{FIELD}.{key}")
    try:
        return json.loads(json.dumps(kwargs))  # a copy the client cannot change, JSON values only
    except (TypeError, ValueError) as e:
        raise FieldError(f"{FIELD} must hold JSON values: {e}", FIELD) from None
