"""Histories fitted to what the chat template accepts.

Real templates refuse shapes of history that an agent's loop brings them, whether the server wrote the
history or the client did, and the loop then stops at a 400:

- Mistral's templates (every one that writes `[TOOL_CALLS]`) raise unless each id of an assistant's tool
  calls, and each tool message's `tool_call_id`, is 9 characters long ("Tool call IDs should be
  alphanumeric strings with length 9!"). This server's ids for those models are, but a history can carry
  OpenAI's `call_...`, Anthropic's `toolu_...`, ids a framework made up. vLLM's Mistral tokenizer mode cuts
  them to their last 9 characters; here each id that does not fit becomes a 9-character alphanumeric digest
  of itself: distinct from the others (cut ids can collide), still pairing a call with its result, and the
  same on every request (the prefix cache and a session's earlier turns still match).
- Meta's Llama 3.1 / 3.2 / 3.3 templates raise "This model only supports single tool-calls at once!" on an
  assistant message with several calls, though the llama3_json format writes several (`; `-separated) and
  this server returns them (parallel_tool_calls). For a template that refuses them, such a message is
  rendered as consecutive assistant messages of one call each, in order, the results following as they
  came: the nearest the template can write (vLLM answers 400).
- Templates that insist on alternating roles (Mistral's, Llama 2's) raise on two user messages in a row,
  which frameworks send (a format instruction after the question, several input items): for a template that
  refuses them, such a run is one message, its texts a paragraph each. Mistral's also raise on any system
  message but a leading one (a second one, or instructions added mid-conversation): for a template that
  refuses them, every system message's text joins one leading system message. Both as mistral_common's
  normalizer (vLLM's Mistral tokenizer mode) does.

Whether a template refuses a shape is found by rendering a small probe of it, and of its fitted form, once
per template. Ids that fit, single calls, alternating roles and templates that take everything get the
messages as they came.
"""

from __future__ import annotations

import hashlib
import string
import threading
from typing import Any, Optional, Sequence, Union

from agentserve.grammar.tool_formats import detect_tool_format

Message = dict[str, Any]

MISTRAL_ID_LENGTH = 9
_ALPHABET = string.ascii_letters + string.digits

_PROBE_TOOLS = [{"type": "function", "function": {"name": "probe", "description": "probe",
                                                  "parameters": {"type": "object", "properties": {}}}}]
_PROBE_IDS = ("probe0001", "probe0002")  # ids every template takes (9 alphanumerics)
_MAX_PROBED_TEMPLATES = 256  # per-request templates (--trust-request-chat-template) are probed once each too


def template_wants_short_ids(chat_template: Union[None, str, dict, Sequence[Any]]) -> bool:
    """Whether the template renders Mistral's tool calls (and so checks the ids' length)."""
    return chat_template is not None and detect_tool_format(chat_template) in ("mistral", "mistral_v11")


def fitted_id(call_id: str) -> str:
    """`call_id` if it is already 9 alphanumeric characters, else a 9-character digest of it."""
    if len(call_id) == MISTRAL_ID_LENGTH and all(c in _ALPHABET for c in call_id):
        return call_id
    value = int.from_bytes(hashlib.sha256(call_id.encode("utf-8", "surrogatepass")).digest()[:8], "big")
    chars = []
    for _ in range(MISTRAL_ID_LENGTH):  # 62^9 ids: a collision between a conversation's ids is negligible
        value, digit = divmod(value, len(_ALPHABET))
        chars.append(_ALPHABET[digit])
    return "".join(chars)


def _fit_calls(calls: Any) -> Any:
    if not isinstance(calls, list):
        return calls
    return [{**c, "id": fitted_id(c["id"])} if isinstance(c, dict) and isinstance(c.get("id"), str) else c
            for c in calls]


def fit_tool_call_ids(messages: Sequence[Message]) -> list[Message]:
    """The messages with every tool-call id (assistant `tool_calls[].id`, tool `tool_call_id`) fitted."""
    out: list[Message] = []
    for m in messages:
        if isinstance(m, dict) and isinstance(m.get("tool_call_id"), str):
            m = {**m, "tool_call_id": fitted_id(m["tool_call_id"])}
        if isinstance(m, dict) and m.get("tool_calls"):
            m = {**m, "tool_calls": _fit_calls(m["tool_calls"])}
        out.append(m)
    return out


def split_tool_calls(messages: Sequence[Message]) -> list[Message]:
    """Each assistant message with several tool calls as consecutive messages of one call each (the text,
    if any, with the first)."""
    out: list[Message] = []
    for m in messages:
        calls = m.get("tool_calls") if isinstance(m, dict) else None
        if not isinstance(calls, list) or len(calls) < 2:
            out.append(m)
            continue
        out.append({**m, "tool_calls": calls[:1]})
        out.extend({"role": m.get("role", "assistant"), "content": "", "tool_calls": [call]} for call in calls[1:])
    return out


def merge_runs(messages: Sequence[Message], role: str) -> list[Message]:
    """Consecutive plain messages of `role` (text content, nothing else) as one, their texts a paragraph each."""
    out: list[Message] = []
    for m in messages:
        prev = out[-1] if out else None
        if _plain(m, role) and prev is not None and _plain(prev, role):
            out[-1] = {**prev, "content": f"{prev['content']}\n\n{m['content']}"}
        else:
            out.append(m)
    return out


def hoist_system(messages: Sequence[Message]) -> list[Message]:
    """Every plain system message's text in one leading system message (paragraphs, in order)."""
    texts = [m["content"] for m in messages if _plain(m, "system")]
    rest = [m for m in messages if not _plain(m, "system")]
    return [{"role": "system", "content": "\n\n".join(texts)}, *rest] if texts else rest


def _plain(m: Any, role: str) -> bool:
    return isinstance(m, dict) and m.get("role") == role and isinstance(m.get("content"), str) and \
        set(m) <= {"role", "content"}


def _calls_probe(calls: int) -> list[Message]:
    ids = _PROBE_IDS[:calls]
    return [{"role": "user", "content": "?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": i, "type": "function", "function": {"name": "probe", "arguments": {}}} for i in ids]},
            *({"role": "tool", "tool_call_id": i, "content": "ok"} for i in ids)]


# What a template may refuse, and the fitted shape it must then take for the fit to apply: (refused probe,
# fitted probe, tools to render them with).
_PROBES: dict[str, tuple[list[Message], list[Message], Optional[list[dict[str, Any]]]]] = {
    "several_calls": (_calls_probe(2), split_tool_calls(_calls_probe(2)), _PROBE_TOOLS),
    "user_run": ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
                 [{"role": "user", "content": "a\n\nb"}], None),
    "late_system": ([{"role": "system", "content": "a"}, {"role": "user", "content": "b"},
                     {"role": "assistant", "content": "c"}, {"role": "system", "content": "d"},
                     {"role": "user", "content": "e"}],
                    [{"role": "system", "content": "a\n\nd"}, {"role": "user", "content": "b"},
                     {"role": "assistant", "content": "c"}, {"role": "user", "content": "e"}], None),
}


class _ProbedTemplates:
    """Per template and probe: whether the template refuses the probe's shape but takes its fitted one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._refuses: dict[tuple[str, str], bool] = {}

    def refuses(self, tokenizer: Any, chat_template: Optional[str], probe: str) -> bool:
        """For `chat_template`, or (None) the tokenizer's own, which may be a dict of named templates."""
        key = (chat_template if chat_template is not None else str(tokenizer.chat_template), probe)
        with self._lock:
            known = self._refuses.get(key)
        if known is not None:
            return known
        refused, fitted, tools = _PROBES[probe]
        refuses = not self._renders(tokenizer, chat_template, refused, tools) and \
            self._renders(tokenizer, chat_template, fitted, tools)
        with self._lock:
            if len(self._refuses) >= _MAX_PROBED_TEMPLATES * len(_PROBES):
                self._refuses.clear()
            self._refuses[key] = refuses
        return refuses

    @staticmethod
    def _renders(tokenizer: Any, chat_template: Optional[str], messages: list[Message],
                 tools: Optional[list[dict[str, Any]]]) -> bool:
        try:
            tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False,
                                          chat_template=chat_template)
        except Exception:  # noqa: BLE001 - raise_exception(...) in the template, or any other failure to render
            return False
        return True


_probed = _ProbedTemplates()


def template_refuses(tokenizer: Any, chat_template: Optional[str], shape: str) -> bool:
    """Whether the template (`chat_template`, else the tokenizer's) refuses `shape` ("several_calls",
    "user_run", "late_system") and takes its fitted form."""
    return _probed.refuses(tokenizer, chat_template, shape)


def _has_run(messages: Sequence[Message], role: str) -> bool:
    return any(_plain(a, role) and _plain(b, role) for a, b in zip(messages, messages[1:]))


def fit_history(messages: list[Message], tokenizer: Any, chat_template: Optional[str] = None) -> list[Message]:
    """`messages` (in the form templates take) fitted to the template that renders them: `chat_template`,
    else the tokenizer's."""
    template = chat_template if chat_template is not None else tokenizer.chat_template
    if not template:
        return messages
    if template_wants_short_ids(template):
        messages = fit_tool_call_ids(messages)
    if any(isinstance(m, dict) and len(m.get("tool_calls") or ()) > 1 for m in messages) and \
            _probed.refuses(tokenizer, chat_template, "several_calls"):
        messages = split_tool_calls(messages)
    if any(_plain(m, "system") for m in messages[1:]) and _probed.refuses(tokenizer, chat_template, "late_system"):
        messages = hoist_system(messages)
    if _has_run(messages, "user") and _probed.refuses(tokenizer, chat_template, "user_run"):
        messages = merge_runs(messages, "user")
    return messages
