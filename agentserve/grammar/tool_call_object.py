"""Tool calls as the streaming parsers of tool_parser.py report them (ContentDelta, ToolCallDelta,
ToolCall), and the scanning of one call object a character at a time: where the object (and each
value in it) ends, its name, and its argument text as it arrives. Malformed input raises
ValueError (the parser keeps such text as content).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

JSON_WS = " \t\r\n"


@dataclass
class ContentDelta:
    text: str


@dataclass
class ToolCallDelta:
    index: int
    arguments_delta: str = ""
    id: Optional[str] = None      # on the first delta of a call
    name: Optional[str] = None    # on the first delta of a call


@dataclass
class ToolCall:
    id: str
    name: str
    arguments_json: str

    @property
    def arguments(self) -> Any:
        return json.loads(self.arguments_json)

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments_json}}


class JsonValueScanner:
    """Finds the end of one JSON value, a character at a time."""

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = False
        self.escape = False
        self.kind = ""  # "container", "string", "scalar"
        self.done = False

    def feed(self, ch: str) -> bool:
        """Consume `ch` if it belongs to the value; False (not consumed) when the value ended before it."""
        if self.done:
            return False
        if not self.kind:
            self._first_char(ch)
        elif self.kind == "scalar":
            if ch in ",}]" or ch in JSON_WS:  # a scalar ends at the first char that is not its own
                self.done = True
                return False
        elif self.in_string:
            self._string_char(ch)
        else:
            self._container_char(ch)
        return True

    def _first_char(self, ch: str) -> None:
        if ch in "{[":
            self.kind, self.depth = "container", 1
        elif ch == '"':
            self.kind, self.in_string = "string", True
        else:
            self.kind = "scalar"

    def _string_char(self, ch: str) -> None:
        if self.escape:
            self.escape = False
        elif ch == "\\":
            self.escape = True
        elif ch == '"':
            self.in_string = False
            if self.kind == "string":
                self.done = True

    def _container_char(self, ch: str) -> None:
        if ch == '"':
            self.in_string = True
        elif ch in "{[":
            self.depth += 1
        elif ch in "}]":
            self.depth -= 1
            if self.depth == 0:
                self.done = True


def _escaped(buf: str) -> bool:
    """Whether the last char of `buf` is escaped by an odd run of backslashes."""
    n = 0
    i = len(buf) - 2
    while i >= 0 and buf[i] == "\\":
        n += 1
        i -= 1
    return n % 2 == 1


class CallObjectScanner:
    """Scans one call object `{"name": ..., "arguments": ...}` after its `{`; streams arguments."""

    def __init__(self, args_keys: tuple[str, ...]) -> None:
        self.args_keys = args_keys
        self.state = "key_or_end"
        self.key_buf = ""
        self.key = ""
        self.value: Optional[JsonValueScanner] = None
        self.value_buf = ""
        self.name: Optional[str] = None
        self.args_raw = ""         # streamed argument text so far
        self.args_pending = ""     # argument text not yet reported
        self.args_is_string = False
        self.args_final: Optional[str] = None
        self.done = False
        self.raw = ""              # every char consumed after the opening `{`
        self._handlers: dict[str, Callable[[str], bool]] = {
            "key_or_end": self._key_or_end, "key": self._key_char, "colon": self._colon,
            "value_start": self._value_start, "value": self._value, "after_value": self._after_value,
        }

    def feed(self, ch: str) -> bool:
        """Consume one char; returns False when the object is complete (char not consumed)."""
        if self.done:
            return False
        self.raw += ch  # a malformed call goes back to content as it was written
        consumed = self._handlers[self.state](ch)
        if not consumed:
            self.raw = self.raw[:-1]
        return consumed

    def _end_object(self) -> bool:
        self.done = True
        self.state = "end"
        return True

    def _key_or_end(self, ch: str) -> bool:
        if ch in JSON_WS or ch == ",":
            return True
        if ch == '"':
            self.state, self.key_buf = "key", '"'
            return True
        if ch == "}":
            return self._end_object()
        raise ValueError(f"unexpected {ch!r} in a tool call object")

    def _key_char(self, ch: str) -> bool:
        self.key_buf += ch
        if ch == '"' and not _escaped(self.key_buf):
            self.key = json.loads(self.key_buf)
            self.state = "colon"
        return True

    def _colon(self, ch: str) -> bool:
        if ch in JSON_WS:
            return True
        if ch == ":":
            self.state = "value_start"
            return True
        raise ValueError(f"unexpected {ch!r} after a key in a tool call object")

    def _value_start(self, ch: str) -> bool:
        if ch in JSON_WS:
            return True
        self.value = JsonValueScanner()
        self.value_buf = ""
        self.state = "value"
        if self.key in self.args_keys and ch == '"':
            self.args_is_string = True
        return self._value(ch)

    def _value(self, ch: str) -> bool:
        assert self.value is not None
        if self.value.feed(ch):
            self._value_char(ch)
            if self.value.done:
                self._value_end()
            return True
        self._value_end()
        return self.feed(ch)

    def _after_value(self, ch: str) -> bool:
        if ch in JSON_WS:
            return True
        if ch == ",":
            self.state = "key_or_end"
            return True
        if ch == "}":
            return self._end_object()
        raise ValueError(f"unexpected {ch!r} after a value in a tool call object")

    def _value_char(self, ch: str) -> None:
        self.value_buf += ch
        if self.key in self.args_keys and not self.args_is_string:
            self.args_raw += ch
            self.args_pending += ch

    def _value_end(self) -> None:
        """Raises ValueError (json's) on a value that is not JSON: such a call is no call (vLLM's parsers
        return the text as content when json.loads fails)."""
        self.state = "after_value"
        value = json.loads(self.value_buf)
        if self.key == "name":
            self.name = value if isinstance(value, str) else json.dumps(value)
        elif self.key in self.args_keys:
            if self.args_is_string:  # arguments given as a JSON-encoded string
                self.args_raw = value if isinstance(value, str) else json.dumps(value)
                self.args_pending = self.args_raw
            self.args_final = self.args_raw


class ArgumentsObjectScanner(CallObjectScanner):
    """The arguments object of a call whose name came before it (Mistral's `[TOOL_CALLS]name[ARGS]{...}`),
    after its `{`: the whole object is the arguments, streamed as it arrives."""

    def __init__(self, name: str) -> None:
        super().__init__(())
        self.name = name
        self._object = JsonValueScanner()
        self._object.feed("{")
        self.args_raw = self.args_pending = "{"

    def feed(self, ch: str) -> bool:
        if self.done:
            return False
        self._object.feed(ch)
        self.args_raw += ch
        self.args_pending += ch
        if self._object.done:
            json.loads(self.args_raw)  # malformed arguments raise ValueError: the parser keeps the text as content
            self.args_final = self.args_raw
            self.done = True
        return True


def partial_marker_suffix(text: str, markers: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a marker."""
    best = 0
    for m in markers:
        for k in range(min(len(m) - 1, len(text)), 0, -1):
            if text.endswith(m[:k]):
                best = max(best, k)
                break
    return best


def merge_events(events: list[Union[ContentDelta, ToolCallDelta]]) -> list[Union[ContentDelta, ToolCallDelta]]:
    """Adjacent content deltas joined, and adjacent argument fragments of one call."""
    out: list[Union[ContentDelta, ToolCallDelta]] = []
    for e in events:
        prev = out[-1] if out else None
        if isinstance(e, ContentDelta) and isinstance(prev, ContentDelta):
            out[-1] = ContentDelta(prev.text + e.text)
        elif (isinstance(e, ToolCallDelta) and isinstance(prev, ToolCallDelta)
              and e.index == prev.index and e.id is None and e.name is None):
            out[-1] = ToolCallDelta(index=prev.index, arguments_delta=prev.arguments_delta + e.arguments_delta,
                                    id=prev.id, name=prev.name)
        else:
            out.append(e)
    return out
