"""Chat messages in OpenAI's shapes, checked and put in the form chat templates take: one
implementation for the HTTP adapter (stateless chat completions) and sessions (gRPC).

Messages are plain dicts:
    {"role": "system" | "user" | "assistant" | "tool", "content": str | None,
     "tool_calls": [{"id": str, "type": "function", "function": {"name": str, "arguments": str | dict}}],
     "tool_call_id": str, "name": str, "token_ids": [int],  # token_ids: raw-token sessions only
     "reasoning_content": str}  # assistant messages of a reasoning model: its thinking (vLLM's key)

Two sets of rules (`MessageRules`), because the callers keep different things:
- `OPENAI_RULES` (HTTP): OpenAI's lenient shapes as vLLM takes them — "developer" is "system", content
  may be a list of text parts, extra keys go through to the template, arguments that are not a JSON
  object stay a string.
- `SESSION_RULES` (sessions): a history that is rendered again every turn — every message says
  something, arguments are JSON objects, only the keys templates read are kept (an assistant message's
  reasoning_content among them: templates of thinking models, Qwen3's, render it).
Every failure is a FieldError naming the field to fix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from agentserve.chat.template_fit import fit_history
from agentserve.errors import FieldError

Message = dict[str, Any]

_TEXT_PART_TYPES = ("text", "input_text", "output_text")  # the last two: Responses-style parts, as vLLM takes them


@dataclass(frozen=True)
class MessageRules:
    roles: tuple[str, ...]
    # A history (sessions): no empty messages, tool-call arguments must be JSON objects, only the keys
    # chat templates read are kept. Otherwise (HTTP) the client's message goes to the template as given.
    history: bool
    # Wording of a bad role: OpenAI clients read "role must be one of", gRPC ones the role first.
    role_message: str


# "ipython": Llama 3.x's own tool-result role, which its template renders and Llama-native clients send
# (vLLM passes custom roles to the template).
OPENAI_RULES = MessageRules(roles=("system", "developer", "user", "assistant", "tool", "ipython"), history=False,
                            role_message="{at}.role must be one of {roles}; got {role!r}")
SESSION_RULES = MessageRules(roles=("system", "user", "assistant", "tool"), history=True,
                             role_message="{at}.role {role!r} is not one of {roles}")


def parse_json_object(text: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise FieldError(f"{what} is not valid JSON: {e}", what) from None
    if not isinstance(value, dict):
        raise FieldError(f"{what} must be a JSON object", what)
    return value


def text_of_parts(parts: list[Any], at: str, *, assistant: bool = False, key: str = "content",
                  bare_strings: bool = True) -> str:
    """OpenAI content parts (`at`.`key`: a message's content, or a Responses function_call_output's output):
    text parts joined by newlines (this server takes text only). An assistant's refusal part (OpenAI's, in
    a reply a client sends back) is its text, as vLLM reads it. `bare_strings`: Chat Completions also
    takes plain strings among the parts; the Responses API does not."""
    texts = []
    for j, part in enumerate(parts):
        if bare_strings and isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and part.get("type") in _TEXT_PART_TYPES and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif assistant and isinstance(part, dict) and part.get("type") == "refusal" \
                and isinstance(part.get("refusal"), str):
            texts.append(part["refusal"])
        elif isinstance(part, dict) and part.get("type") in _TEXT_PART_TYPES:
            raise FieldError(f"{at}.{key}[{j}].text must be a string (a {part['type']} part's text), got "
                             f"{type(part.get('text')).__name__ if 'text' in part else 'none'}", f"{at}.{key}[{j}].text")
        else:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise FieldError(f"{at}.{key}[{j}]: content parts of type {kind!r} are not supported (this model "
                             "takes text only)", f"{at}.{key}[{j}].type")
    return "\n".join(texts)


def _content(m: Message, at: str) -> Optional[str]:
    content = m.get("content")
    if isinstance(content, list):
        return text_of_parts(content, at, assistant=m.get("role") == "assistant")
    if content is not None and not isinstance(content, str):
        raise FieldError(f"{at}.content must be a string, a list of content parts or null", f"{at}.content")
    return content


def _reasoning_content(m: Message, role: str, at: str) -> Optional[str]:
    """A history message's reasoning_content: text, on assistant messages only."""
    reasoning = m.get("reasoning_content")
    if reasoning is None or reasoning == "":
        return None
    if not isinstance(reasoning, str):
        raise FieldError(f"{at}.reasoning_content must be a string", f"{at}.reasoning_content")
    if role != "assistant":
        raise FieldError(f"{at}: reasoning_content is only for assistant messages (role is {role!r})",
                         f"{at}.reasoning_content")
    return reasoning


def _check_presence(role: str, content: Optional[str], has_calls: bool, at: str, rules: MessageRules) -> None:
    if rules.history:
        if role == "assistant" and not content and not has_calls:
            raise FieldError(f"{at}: an assistant message needs content or tool_calls (or reasoning_content)",
                             f"{at}.content")
        if role != "assistant" and not content:
            raise FieldError(f"{at} ({role}) has no content", f"{at}.content")
    elif content is None and role != "assistant":
        raise FieldError(f"{at} ({role}) needs content", f"{at}.content")


def _arguments(fn: dict[str, Any], at: str, rules: MessageRules) -> Any:
    """Tool-call arguments as the object templates write with tojson (as vLLM gives them)."""
    args = fn.get("arguments", "{}")
    if rules.history:
        if isinstance(args, str):
            return parse_json_object(args or "{}", f"{at}.arguments")
        if not isinstance(args, dict):
            raise FieldError(f"{at}.arguments must be a JSON object", f"{at}.arguments")
        return args
    if isinstance(args, str):
        try:
            parsed = json.loads(args or "{}")
        except json.JSONDecodeError:
            return args
        return parsed if isinstance(parsed, dict) else args
    return args


def _tool_calls(m: Message, role: str, i: int, at: str, rules: MessageRules) -> list[dict[str, Any]]:
    tool_calls = m.get("tool_calls") or []
    if not tool_calls:
        return []
    if role != "assistant":
        raise FieldError(f"{at}: only assistant messages carry tool_calls (role is {role!r})", f"{at}.tool_calls")
    if not isinstance(tool_calls, list):
        raise FieldError(f"{at}.tool_calls must be a list", f"{at}.tool_calls")
    calls = []
    for j, tc in enumerate(tool_calls):
        fn = tc.get("function", tc) if isinstance(tc, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise FieldError(f"{at}.tool_calls[{j}].function.name is required: a tool call needs a function name",
                             f"{at}.tool_calls[{j}].function.name")
        calls.append({"id": tc.get("id") or f"call_{i}_{j}", "type": "function",
                      "function": {"name": fn["name"], "arguments": _arguments(fn, f"{at}.tool_calls[{j}]", rules)}})
    return calls


def _raw_token_message(m: Message, role: str, at: str, vocab_size: int) -> Message:
    token_ids = list(m.get("token_ids") or [])
    if not token_ids:
        raise FieldError(f"{at} has no token_ids: every message of a raw-token session carries its tokens",
                         f"{at}.token_ids")
    bad = [t for t in token_ids if not isinstance(t, int) or not 0 <= t < vocab_size]
    if bad:
        raise FieldError(f"{at}.token_ids must be integers in [0, {vocab_size}); got {bad[:5]}", f"{at}.token_ids")
    return {"role": role, "token_ids": token_ids}


def _role(m: Any, at: str, rules: MessageRules) -> str:
    if not isinstance(m, dict):
        raise FieldError(f"{at} must be an object", at)
    role = m.get("role")
    if role not in rules.roles:
        raise FieldError(rules.role_message.format(at=at, role=role, roles=", ".join(rules.roles)), f"{at}.role")
    return role


def _text_message(m: Message, role: str, i: int, at: str, rules: MessageRules) -> Message:
    if rules.history and m.get("token_ids"):
        raise FieldError(f"{at}.token_ids is only for raw-token sessions (raw_tokens=true); send content instead",
                         f"{at}.token_ids")
    if rules.history and m.get("tool_call_id") and role != "tool":
        raise FieldError(f"{at}: tool_call_id is only for tool messages (role is {role!r})", f"{at}.tool_call_id")
    content = _content(m, at)
    calls = _tool_calls(m, role, i, at, rules)
    if rules.history:
        # A reply cut short while thinking has only reasoning: it is a message of its own.
        reasoning = _reasoning_content(m, role, at)
        _check_presence(role, content, bool(calls) or reasoning is not None, at, rules)
        msg: Message = {"role": role, "content": content if content else None}
        if reasoning is not None:
            msg["reasoning_content"] = reasoning
        if role == "tool":
            msg.update({k: m[k] for k in ("tool_call_id", "name") if m.get(k)})
    else:
        _check_presence(role, content, bool(calls), at, rules)
        msg = {k: v for k, v in m.items() if k not in ("role", "content", "tool_calls")}
        msg.update(role="system" if role == "developer" else role, content=content)
    if calls:
        msg["tool_calls"] = calls
    return msg


def template_messages(messages: Sequence[Message], tokenizer: Any, chat_template: Optional[str] = None) -> list[Message]:
    """The messages as the template that renders them (`chat_template`, else the tokenizer's) reads them: a
    null or missing content (an assistant message that only calls tools) is the empty string, as vLLM passes
    it, since templates that concatenate message['content'] fail on a null one and those that test it treat
    both alike; and tool calls in the shapes the template takes (chat/template_fit.py)."""
    out = [{**m, "content": ""} if isinstance(m, dict) and m.get("content") is None else m for m in messages]
    return fit_history(out, tokenizer, chat_template)


def normalize_messages(messages: Sequence[Message], rules: MessageRules, *, raw_tokens: bool = False,
                       vocab_size: int = 0, where: str = "messages") -> list[Message]:
    """Checks roles and shapes; returns the messages in the form chat templates take (tool-call
    arguments as dicts). `raw_tokens`: a raw-token session's messages, token ids instead of content."""
    out: list[Message] = []
    for i, m in enumerate(messages):
        at = f"{where}[{i}]"
        role = _role(m, at, rules)
        out.append(_raw_token_message(m, role, at, vocab_size) if raw_tokens else _text_message(m, role, i, at, rules))
    return out
