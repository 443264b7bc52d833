"""Messages and tools in OpenAI's shapes: validation, and rendering through the model's chat template
(in a render pool worker: `prepare_create` and `prepare_turn`; never on the engine's step thread).

Messages here are plain dicts (the gRPC service and the HTTP adapter convert to them):
    {"role": "system" | "user" | "assistant" | "tool", "content": str | None,
     "tool_calls": [{"id": str, "type": "function", "function": {"name": str, "arguments": str | dict}}],
     "tool_call_id": str, "name": str, "token_ids": [int]}   # token_ids: raw-token sessions only
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from agentserve.chat.render_pool import RenderPool
from agentserve.engine.engine import InvalidRequestError

ROLES = ("system", "user", "assistant", "tool")
Message = dict[str, Any]


def _bad(msg: str) -> InvalidRequestError:
    return InvalidRequestError(msg)


def normalize_tools(tools: Optional[Sequence[dict[str, Any]]]) -> Optional[list[dict[str, Any]]]:
    """Validates OpenAI-style tools ({"type": "function", "function": {name, description, parameters}})."""
    if not tools:
        return None
    out = []
    names = set()
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict):
            raise _bad(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}")
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise _bad(f"tools[{i}].name must be a non-empty string")
        if name in names:
            raise _bad(f"tools[{i}].name {name!r} is declared twice")
        names.add(name)
        params = fn.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise _bad(f"tools[{i}] ({name}): parameters must be a JSON object schema")
        entry = dict(fn)  # the client's key order: templates serialise the tools as given
        entry["parameters"] = params
        if entry.get("description") is None:
            entry.pop("description", None)
        out.append({"type": "function", "function": entry})
    return out


def parse_json_object(text: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise _bad(f"{what} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise _bad(f"{what} must be a JSON object")
    return value


def normalize_messages(messages: Sequence[Message], *, raw_tokens: bool, vocab_size: int,
                       where: str = "messages") -> list[Message]:
    """Checks roles and shapes; returns the messages in the form the chat templates take (tool-call
    arguments as dicts). Raises InvalidRequestError naming the offending field."""
    out: list[Message] = []
    for i, m in enumerate(messages):
        at = f"{where}[{i}]"
        if not isinstance(m, dict):
            raise _bad(f"{at} must be an object")
        role = m.get("role")
        if role not in ROLES:
            raise _bad(f"{at}.role {role!r} is not one of {', '.join(ROLES)}")
        token_ids = list(m.get("token_ids") or [])
        if raw_tokens:
            if not token_ids:
                raise _bad(f"{at} has no token_ids: every message of a raw-token session carries its tokens")
            bad = [t for t in token_ids if not isinstance(t, int) or not 0 <= t < vocab_size]
            if bad:
                raise _bad(f"{at}.token_ids must be integers in [0, {vocab_size}); got {bad[:5]}")
            out.append({"role": role, "token_ids": token_ids})
            continue
        if token_ids:
            raise _bad(f"{at}.token_ids is only for raw-token sessions (raw_tokens=true); send content instead")
        content = m.get("content")
        if content is not None and not isinstance(content, str):
            raise _bad(f"{at}.content must be a string")
        tool_calls = m.get("tool_calls") or []
        if tool_calls and role != "assistant":
            raise _bad(f"{at}: only assistant messages carry tool_calls (role is {role!r})")
        if m.get("tool_call_id") and role != "tool":
            raise _bad(f"{at}: tool_call_id is only for tool messages (role is {role!r})")
        if role == "assistant":
            if not content and not tool_calls:
                raise _bad(f"{at}: an assistant message needs content or tool_calls")
        elif not content:
            raise _bad(f"{at} ({role}) has no content")
        msg: Message = {"role": role, "content": content if content else None}
        if tool_calls:
            calls = []
            for j, tc in enumerate(tool_calls):
                fn = tc.get("function", tc) if isinstance(tc, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
                    raise _bad(f"{at}.tool_calls[{j}] needs a function name")
                args = fn.get("arguments", "{}")
                if isinstance(args, str):
                    args = parse_json_object(args or "{}", f"{at}.tool_calls[{j}].arguments")
                elif not isinstance(args, dict):
                    raise _bad(f"{at}.tool_calls[{j}].arguments must be a JSON object")
                calls.append({"id": tc.get("id") or f"call_{i}_{j}", "type": "function",
                              "function": {"name": fn["name"], "arguments": args}})
            msg["tool_calls"] = calls
        if role == "tool":
            if m.get("tool_call_id"):
                msg["tool_call_id"] = m["tool_call_id"]
            if m.get("name"):
                msg["name"] = m["name"]
        out.append(msg)
    return out


def has_chat_template(tokenizer: Any) -> bool:
    return tokenizer is not None and bool(tokenizer.chat_template)


_MARKER = "@@agentserve-content@@"


def assistant_content_prefix(tokenizer: Any, messages: Sequence[Message], tools: Optional[list[dict[str, Any]]],
                             prompt_text: str) -> str:
    """The text a template puts between its generation prompt and an assistant message's content
    (Llama 2's ' ' after '[/INST]'; '' for most templates). A reply is recorded in the history
    without it, so that re-rendering the history reproduces the generated text exactly."""
    try:
        text = tokenizer.apply_chat_template(list(messages) + [{"role": "assistant", "content": _MARKER}], tools=tools,
                                             add_generation_prompt=False, tokenize=False)
    except Exception:  # noqa: BLE001 - a template that refuses the probe: assume no separator
        return ""
    at = text.find(_MARKER)
    if at < 0 or not text.startswith(prompt_text):
        return ""
    return text[len(prompt_text):at]


def decode_continuation(tokenizer: Any, context_ids: Sequence[int], ids: Sequence[int]) -> str:
    """The text `ids` add after `context_ids` (special tokens spelled out). Decoding them alone would
    lose a leading space with SentencePiece-style decoders, so a few context tokens go first."""
    ctx = list(context_ids[-4:])
    base = tokenizer.decode(ctx, skip_special_tokens=False)
    full = tokenizer.decode(ctx + list(ids), skip_special_tokens=False)
    if full.startswith(base):
        return full[len(base):]
    return tokenizer.decode(list(ids), skip_special_tokens=False)


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


# --- rendering off the step thread (a render pool worker) --------------------------------------------
@dataclass
class RenderedCreate:
    """A new session's messages, ready for the step thread to adopt."""
    messages: list[Message]
    tools: Optional[list[dict[str, Any]]]
    text: str
    token_ids: list[int]


def prepare_create(pool: RenderPool, tokenizer: Any, messages: Sequence[Message],
                   tools: Optional[Sequence[dict[str, Any]]], *, raw: bool, vocab_size: int) -> RenderedCreate:
    if raw and tools:
        raise _bad("tools need a chat template; this session takes raw tokens")
    tools_n = normalize_tools(tools)
    msgs = normalize_messages(messages, raw_tokens=raw, vocab_size=vocab_size)
    if raw:
        return RenderedCreate(msgs, tools_n, "", [t for m in msgs for t in m["token_ids"]])
    text = pool.render(tokenizer, msgs, tools_n, add_generation_prompt=False) if msgs else ""
    return RenderedCreate(msgs, tools_n, text, pool.encode(tokenizer, text, "messages", add_special_tokens=False))


@dataclass
class TurnBasis:
    """What a turn's prompt is built on: the session's history, read when the turn reserved the
    session (it cannot change while the session is busy)."""
    messages: list[Message]
    text: str
    token_ids: list[int]
    tools: Optional[list[dict[str, Any]]]
    raw_tokens: bool


@dataclass
class RenderedTurn:
    new_messages: list[Message]
    prompt: list[int]
    prompt_text: str
    common_prefix: Optional[int]  # the history re-rendered differently: tokens it still shares
    content_prefix: str


def prepare_turn(pool: RenderPool, tokenizer: Any, basis: TurnBasis, messages: Sequence[Message],
                 vocab_size: int) -> RenderedTurn:
    new = normalize_messages(messages, raw_tokens=basis.raw_tokens, vocab_size=vocab_size)
    if not new and (not basis.messages or basis.messages[-1]["role"] == "assistant"):
        raise _bad("the turn has no new messages (send a user message or tool results)")
    if basis.raw_tokens:
        prompt = basis.token_ids + [t for m in new for t in m["token_ids"]]
        return RenderedTurn(new, prompt, "", None, "")
    history = basis.messages + new
    prompt_text = pool.render(tokenizer, history, basis.tools, add_generation_prompt=True)
    common: Optional[int] = None
    if prompt_text.startswith(basis.text):
        prompt = basis.token_ids + pool.encode(tokenizer, prompt_text[len(basis.text):], "messages",
                                               add_special_tokens=False)
    else:
        # The template renders the history differently from the tokens the session holds.
        prompt = pool.encode(tokenizer, prompt_text, "messages", add_special_tokens=False)
        common = common_prefix_len(basis.token_ids, prompt)
    prefix = assistant_content_prefix(tokenizer, history, basis.tools, prompt_text)
    return RenderedTurn(new, prompt, prompt_text, common, prefix)
