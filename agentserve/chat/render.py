"""Chat templates for sessions: a session's history rendered append-consistently, so that a turn
prefills only what is new (in a render pool worker: `prepare_create` and `prepare_turn`; never on the
engine's step thread). Messages are checked by chat/messages.py, tools by chat/tools.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from agentserve.chat.messages import SESSION_RULES, Message, normalize_messages, template_messages
from agentserve.chat.render_pool import RenderPool
from agentserve.chat.template_kwargs import checked_template_kwargs
from agentserve.chat.tools import normalize_tools
from agentserve.errors import FieldError, InvalidRequestError


def has_chat_template(tokenizer: Any) -> bool:
    return tokenizer is not None and bool(tokenizer.chat_template)


_MARKER = "@@agentserve-content@@"


def assistant_content_prefix(tokenizer: Any, messages: Sequence[Message], tools: Optional[list[dict[str, Any]]],
                             prompt_text: str, template_kwargs: Optional[dict[str, Any]] = None) -> str:
    """The text a template puts between its generation prompt and an assistant message's content
    (Llama 2's ' ' after '[/INST]'; '' for most templates). A reply is recorded in the history
    without it, so that re-rendering the history reproduces the generated text exactly."""
    try:
        probe = template_messages([*messages, {"role": "assistant", "content": _MARKER}], tokenizer)
        text = tokenizer.apply_chat_template(probe, tools=tools, add_generation_prompt=False, tokenize=False,
                                             **(template_kwargs or {}))
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
    template_kwargs: dict[str, Any]


def prepare_create(pool: RenderPool, tokenizer: Any, messages: Sequence[Message],
                   tools: Optional[Sequence[dict[str, Any]]], *, raw: bool, vocab_size: int,
                   template_kwargs: Optional[dict[str, Any]] = None) -> RenderedCreate:
    if raw and tools:
        raise FieldError("tools need a chat template; this session takes raw tokens", "tools")
    if raw and template_kwargs:
        raise FieldError("chat_template_kwargs need a chat template; this session takes raw tokens",
                         "chat_template_kwargs")
    tools_n = normalize_tools(tools)
    kwargs = checked_template_kwargs(template_kwargs)
    msgs = normalize_messages(messages, SESSION_RULES, raw_tokens=raw, vocab_size=vocab_size)
    if raw:
        return RenderedCreate(msgs, tools_n, "", [t for m in msgs for t in m["token_ids"]], kwargs)
    text = pool.render(tokenizer, msgs, tools_n, add_generation_prompt=False, template_kwargs=kwargs) if msgs else ""
    if not msgs and kwargs:  # a template that rejects the variables fails now, not at the first turn
        pool.render(tokenizer, [{"role": "user", "content": "?"}], tools_n, add_generation_prompt=True,
                    field="chat_template_kwargs", template_kwargs=kwargs)
    return RenderedCreate(msgs, tools_n, text, pool.encode(tokenizer, text, "messages", add_special_tokens=False),
                          kwargs)


@dataclass
class TurnBasis:
    """What a turn's prompt is built on: the session's history, read when the turn reserved the
    session (it cannot change while the session is busy)."""
    messages: list[Message]
    text: str
    token_ids: list[int]
    tools: Optional[list[dict[str, Any]]]
    raw_tokens: bool
    template_kwargs: dict[str, Any]


@dataclass
class RenderedTurn:
    new_messages: list[Message]
    prompt: list[int]
    prompt_text: str
    common_prefix: Optional[int]  # the history re-rendered differently: tokens it still shares
    content_prefix: str


def prepare_turn(pool: RenderPool, tokenizer: Any, basis: TurnBasis, messages: Sequence[Message],
                 vocab_size: int) -> RenderedTurn:
    new = normalize_messages(messages, SESSION_RULES, raw_tokens=basis.raw_tokens, vocab_size=vocab_size)
    if not new and (not basis.messages or basis.messages[-1]["role"] == "assistant"):
        raise InvalidRequestError("the turn has no new messages (send a user message or tool results)")
    if basis.raw_tokens:
        prompt = basis.token_ids + [t for m in new for t in m["token_ids"]]
        return RenderedTurn(new, prompt, "", None, "")
    history = basis.messages + new
    prompt_text = pool.render(tokenizer, history, basis.tools, add_generation_prompt=True,
                              template_kwargs=basis.template_kwargs)
    common: Optional[int] = None
    if prompt_text.startswith(basis.text):
        prompt = basis.token_ids + pool.encode(tokenizer, prompt_text[len(basis.text):], "messages",
                                               add_special_tokens=False)
    else:
        # The template renders the history differently from the tokens the session holds.
        prompt = pool.encode(tokenizer, prompt_text, "messages", add_special_tokens=False)
        common = common_prefix_len(basis.token_ids, prompt)
    prefix = assistant_content_prefix(tokenizer, history, basis.tools, prompt_text, basis.template_kwargs)
    return RenderedTurn(new, prompt, prompt_text, common, prefix)
