"""Tool-call histories fitted to what the chat template accepts.

Real templates refuse two shapes of tool-call history that an agent's loop brings them, whether the server
wrote the history or the client did, and the loop then stops at a 400:

- Mistral's templates (every one that writes `[TOOL_CALLS]`) raise unless each id of an assistant's tool
  calls, and each tool message's `tool_call_id`, is 9 characters long ("Tool call IDs should be
  alphanumeric strings with length 9!"). This server's ids for those models are, but a history can carry
  OpenAI's `call_...`, Anthropic's `toolu_...`, ids a framework made up. vLLM's Mistral tokenizer mode cuts
  them to their last 9 characters; here each id that does not fit becomes a 9-character alphanumeric digest
  of itself: distinct from the others (cut ids can collide), still pairing a call with its result, and the
  same on every request (the prefix cache and a session's earlier turns still match).
- Meta's Llama 3.1 / 3.2 / 3.3 templates raise "This model only supports single tool-calls at once!" on an
  assistant message with several calls, though the llama3_json format writes several (`; `-separated) and
  this server returns them (parallel_tool_calls). For a template that refuses them, found by rendering a
  probe once per template, such a message is rendered as consecutive assistant messages of one call each,
  in order, the results following as they came: the nearest the template can write (vLLM answers 400).

Ids that fit, single calls and templates that take everything get the messages as they came.
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


def _probe(calls: int) -> list[Message]:
    ids = _PROBE_IDS[:calls]
    return [{"role": "user", "content": "?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": i, "type": "function", "function": {"name": "probe", "arguments": {}}} for i in ids]},
            *({"role": "tool", "tool_call_id": i, "content": "ok"} for i in ids)]


class _ProbedTemplates:
    """Per template: whether it refuses several calls in one message but takes them one by one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._one_call_only: dict[str, bool] = {}

    def one_call_only(self, tokenizer: Any, chat_template: Optional[str]) -> bool:
        """For `chat_template`, or (None) the tokenizer's own, which may be a dict of named templates."""
        key = chat_template if chat_template is not None else str(tokenizer.chat_template)
        with self._lock:
            known = self._one_call_only.get(key)
        if known is not None:
            return known
        one_only = not self._renders(tokenizer, chat_template, _probe(2)) and \
            self._renders(tokenizer, chat_template, split_tool_calls(_probe(2)))
        with self._lock:
            if len(self._one_call_only) >= _MAX_PROBED_TEMPLATES:
                self._one_call_only.clear()
            self._one_call_only[key] = one_only
        return one_only

    @staticmethod
    def _renders(tokenizer: Any, chat_template: Optional[str], messages: list[Message]) -> bool:
        try:
            tokenizer.apply_chat_template(messages, tools=_PROBE_TOOLS, add_generation_prompt=True, tokenize=False,
                                          chat_template=chat_template)
        except Exception:  # noqa: BLE001 - raise_exception(...) in the template, or any other failure to render
            return False
        return True


_probed = _ProbedTemplates()


def fit_tool_history(messages: list[Message], tokenizer: Any, chat_template: Optional[str] = None) -> list[Message]:
    """`messages` (in the form templates take) fitted to the template that renders them: `chat_template`,
    else the tokenizer's."""
    template = chat_template if chat_template is not None else tokenizer.chat_template
    if not template:
        return messages
    if template_wants_short_ids(template):
        messages = fit_tool_call_ids(messages)
    if any(isinstance(m, dict) and len(m.get("tool_calls") or ()) > 1 for m in messages) and \
            _probed.one_call_only(tokenizer, chat_template):
        messages = split_tool_calls(messages)
    return messages
