"""A reply's tool calls in OpenAI's chat shapes, on top of chat/reply.py's parser:
- whole responses: `message.content` plus `message.tool_calls` ([{id, type, function: {name, arguments}}]);
- streams: chat-chunk deltas `{"content": ...}` and
  `{"tool_calls": [{"index", "id", "type", "function": {"name", "arguments"}}]}` (the first fragment of a
  call carries id, type and name; later ones only index and an arguments fragment).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from agentserve.chat.reply import ReplyEvent, ReplyParser, content_beside_calls
from agentserve.grammar.tool_call_object import ContentDelta

Chunk = dict[str, Any]


class ToolCallChunks:
    """Per-choice state: feed text deltas, get chat-chunk deltas; or parse a whole text. Without a
    known tool-call format the text is all content."""

    def __init__(self, fmt: Optional[str], tools: list[dict[str, Any]], parallel: bool = True,
                 typed_answer: bool = False) -> None:
        self.parallel = parallel
        self._parser = ReplyParser(fmt, tools, typed_answer) if fmt is not None else None
        self._started: set[int] = set()

    def _call_chunk(self, index: int, call_id: Optional[str], name: Optional[str], arguments: str) -> Optional[Chunk]:
        entry: dict[str, Any] = {"index": index}
        if index not in self._started:
            self._started.add(index)
            entry.update(id=call_id or f"call_{index}", type="function", function={"name": name or "",
                                                                                   "arguments": arguments})
        elif arguments:
            entry["function"] = {"arguments": arguments}
        else:
            return None
        return {"tool_calls": [entry]}

    def _to_chunks(self, events: Sequence[ReplyEvent]) -> list[Chunk]:
        out: list[Chunk] = []
        for e in events:
            if isinstance(e, ContentDelta):
                if e.text:
                    out.append({"content": e.text})
                continue
            if e.index > 0 and not self.parallel:
                continue
            chunk = self._call_chunk(e.index, e.id, e.name, e.arguments_delta or "")
            if chunk is not None:
                out.append(chunk)
        return out

    @property
    def cut_off(self) -> bool:
        """After finish() or parse_whole(): whether the last call was cut off (a stop, max_tokens)."""
        return self._parser is not None and self._parser.cut_off

    def feed(self, text: str) -> list[Chunk]:
        if self._parser is None:
            return [{"content": text}] if text else []
        if not text:
            return []
        return self._to_chunks(self._parser.feed(text))

    def finish(self) -> list[Chunk]:
        if self._parser is None:
            return []
        return self._to_chunks(self._parser.flush())

    def parse_whole(self, text: str) -> tuple[Optional[str], list[dict[str, Any]]]:
        if self._parser is None:
            return text, []
        self._parser.feed(text)
        content, calls = self._parser.finish()
        if not self.parallel:
            calls = calls[:1]
        if calls:  # beside calls, whitespace-only text is no content: OpenAI gives null
            return content_beside_calls(content or "", True) or None, calls
        return content or "", calls
