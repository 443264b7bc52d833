"""Tool calls in OpenAI's shapes, on top of the grammar package's parser (agentserve/grammar/tool_parser.py).

`grammar.tool_formats` detects the model's tool-call format from its chat template and parses generated
text into calls (Hermes/Qwen `<tool_call>` tags, Llama 3.1 JSON, Mistral `[TOOL_CALLS]`), as
argument deltas while they are generated. This module turns that into:
- whole responses: `message.content` plus `message.tool_calls` ([{id, type, function: {name, arguments}}]);
- streams: chat-chunk deltas `{"content": ...}` and
  `{"tool_calls": [{"index", "id", "type", "function": {"name", "arguments"}}]}` (the first fragment of a
  call carries id, type and name; later ones only index and an arguments fragment).
"""

from __future__ import annotations

import logging
import re
from typing import Any, Optional

from agentserve.grammar.tool_constraint import parse_tools
from agentserve.grammar.tool_formats import detect_tool_format
from agentserve.grammar.tool_parser import ToolCallParser

logger = logging.getLogger(__name__)


def tool_format_of(tokenizer: Any) -> Optional[str]:
    """The chat template's tool-call format name, or None when unknown."""
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if not template:
        return None
    try:
        return detect_tool_format(template)
    except Exception:  # noqa: BLE001 - an unknown template is "no format", not a server error
        logger.warning("could not detect the tool-call format of the chat template", exc_info=True)
        return None


def check_tool_schemas(tools: list[dict[str, Any]]) -> None:
    """Normalizes the tools' parameter schemas as the grammar will (dialects like "type": "dict"
    are fine); raises OpenAIError 400 naming the unsupported keyword and its path."""
    try:
        parse_tools(tools)
    except ValueError as e:
        from agentserve.adapters.openai.protocol import OpenAIError

        msg = str(e)
        match = re.search(r"(tools\[\d+\][\w.\[\]$]*)", msg)
        raise OpenAIError(400, f"unsupported tool definition: {msg}",
                          param=match.group(1) if match else "tools") from None


def _get(obj: Any, *names: str) -> Any:
    for name in names:
        if isinstance(obj, dict):
            if name in obj:
                return obj[name]
        elif hasattr(obj, name):
            return getattr(obj, name)
    return None


def _call_dict(call: Any, index: int) -> dict[str, Any]:
    to_openai = getattr(call, "to_openai", None)
    if callable(to_openai):
        return to_openai()
    fn = _get(call, "function")
    name = _get(fn if fn is not None else call, "name")
    args = _get(fn if fn is not None else call, "arguments")
    if not isinstance(args, str):
        import json

        args = json.dumps(args if args is not None else {}, ensure_ascii=False)
    call_id = _get(call, "id") or f"call_{index}"
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}


class ToolCallStream:
    """Per-choice state: feed text deltas, get chat-chunk deltas; or parse a whole text."""

    def __init__(self, fmt: Optional[str], tools: list[dict[str, Any]], tool_choice: Any,
                 parallel: bool = True) -> None:
        self.fmt = fmt
        self.tools = tools
        self.tool_choice = tool_choice
        self.parallel = parallel
        self._parser = None
        if fmt is not None:
            self._parser = ToolCallParser(fmt, tools)
        self._started: set[int] = set()

    # --- streaming ----------------------------------------------------------------------------------
    def _to_chunks(self, items: list[Any]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for d in items:
            content = _get(d, "content", "content_delta", "text")
            if isinstance(content, str) and content and _get(d, "name", "arguments_delta") is None:
                out.append({"content": content})
                continue
            index = _get(d, "index") or 0
            if index > 0 and not self.parallel:
                continue
            entry: dict[str, Any] = {"index": index}
            if index not in self._started:
                self._started.add(index)
                entry["id"] = _get(d, "id") or f"call_{index}"
                entry["type"] = "function"
                entry["function"] = {"name": _get(d, "name") or "", "arguments": _get(d, "arguments_delta") or ""}
            else:
                frag = _get(d, "arguments_delta") or ""
                if not frag:
                    continue
                entry["function"] = {"arguments": frag}
            out.append({"tool_calls": [entry]})
        return out

    def feed(self, text: str) -> list[dict[str, Any]]:
        if self._parser is None:
            return [{"content": text}] if text else []
        if not text:
            return []
        return self._to_chunks(list(self._parser.feed(text)))

    def finish(self) -> list[dict[str, Any]]:
        if self._parser is None:
            return []
        tail = getattr(self._parser, "flush", None)
        items = list(tail()) if callable(tail) else []
        return self._to_chunks(items)

    # --- whole text ---------------------------------------------------------------------------------
    def parse_whole(self, text: str) -> tuple[Optional[str], list[dict[str, Any]]]:
        if self._parser is None:
            return text, []
        self._parser.feed(text)
        content, calls = self._parser.finish()
        result = [_call_dict(c, i) for i, c in enumerate(calls or [])]
        if not self.parallel:
            result = result[:1]
        if result:  # beside calls, whitespace-only text is no content (OpenAI gives null)
            return (content if content and content.strip() else None), result
        return content or "", result
