"""Parsing a model's output into content and tool calls, incrementally: one small parser class per
tool-call format (tool_formats.py), on a shared base that handles free text, markers split across
deltas and the call objects themselves (tool_call_object.py, which also defines the events and
ToolCall it reports).

    parser = ToolCallParser("hermes")      # -> HermesToolParser
    for delta_text in stream: events = parser.feed(delta_text)   # ContentDelta / ToolCallDelta
    content, calls = parser.finish()
"""

from __future__ import annotations

import re
from typing import Any, Optional, Sequence, Union

from agentserve.grammar.tool_call_object import (JSON_WS, ArgumentsObjectScanner, CallObjectScanner, ContentDelta,
                                                 ToolCall, ToolCallDelta, merge_events, partial_marker_suffix)
from agentserve.grammar.tool_formats import (HERMES_CLOSE, HERMES_OPEN, MISTRAL_ARGS, MISTRAL_OPEN, PYTHON_TAG, TOOL_FORMATS,
                                             new_call_id)

Event = Union[ContentDelta, ToolCallDelta]


class ToolCallParser:
    """Incremental parser of a model's output into content and tool calls.

    `ToolCallParser(fmt)` makes the format's parser (the PARSERS below). Argument fragments are reported
    as they arrive (a call's first delta carries its id and name) and concatenate to its `arguments_json`.
    The parser needs the output text with the format's markers (decode without skipping special tokens,
    or keep the marker tokens). A call cut off by the end of the output is not among the calls
    (`truncated`); when its name had arrived it is `partial_call` (its arguments as far as they got), for
    the servers to return with finish_reason "length". `bare_calls=False` (a typed final answer beside
    tools): a JSON output is the answer; llama3_json calls start with `<|python_tag|>`.

    Modes: "text" (free text, watching for the opener), "obj" (inside a call object), and the
    format's own modes between those (`_feed_format`).
    """

    fmt = ""
    opener = ""
    after_opener_mode = ""          # the mode the opener leads into
    after_call_mode = ""            # the mode after a call object
    unclosed_modes: tuple[str, ...] = ()  # modes in which the end of output leaves calls unfinished

    def __new__(cls, fmt: str, tools: Optional[Sequence[Any]] = None, *, bare_calls: bool = True) -> "ToolCallParser":
        if cls is ToolCallParser:
            if fmt not in PARSERS:
                raise ValueError(f"unknown tool-call format {fmt!r}; expected one of {TOOL_FORMATS}")
            cls = PARSERS[fmt]
        return super().__new__(cls)

    def __init__(self, fmt: str, tools: Optional[Sequence[Any]] = None, *, bare_calls: bool = True) -> None:
        self.args_keys = ("arguments", "parameters")
        self.bare_calls = bare_calls
        self.partial_call: Optional[ToolCall] = None
        self.mode = "text"
        self.pending = ""        # text held back (may be the start of a marker)
        self.content_parts: list[str] = []
        self.calls: list[ToolCall] = []
        self.truncated = False
        self._obj: Optional[CallObjectScanner] = None
        self._opening = ""  # the text of the current call before its object (opener, separators, `{`)
        self._call_index = -1
        self._call_id = ""
        self._announced = False
        self._finished = False
        self._between_calls = True  # only whitespace since the start / the last call block

    # -- public -------------------------------------------------------------------------------
    def feed(self, text: str) -> list[Event]:
        events: list[Event] = []
        for ch in text:
            self._feed_char(ch, events)
        self._flush_content(events, final=False)
        self._flush_args(events)
        return merge_events(events)

    def flush(self) -> list[Event]:
        """End of output: the last deltas (held-back text that turned out not to be a marker)."""
        events: list[Event] = []
        if self._finished:
            return events
        self._finished = True
        if self.mode == "text":
            self._flush_content(events, final=True)
        elif self.mode == "obj":
            self._flush_args(events)
            self.truncated = True  # a call cut off mid-object is not among the calls
            obj = self._obj
            if obj is not None and obj.name is not None:
                args = obj.args_final if obj.args_final is not None else obj.args_raw
                self.partial_call = ToolCall(id=self._call_id, name=obj.name, arguments_json=args)
            self._obj = None
        elif self.mode in self.unclosed_modes:
            self.truncated = True  # the format's closing part is missing
        return merge_events(events)

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(content, complete tool calls). Calls `flush()` if it was not called."""
        self.flush()
        return "".join(self.content_parts), list(self.calls)

    @property
    def content(self) -> str:
        return "".join(self.content_parts)

    # -- per-format hooks ---------------------------------------------------------------------
    def _feed_format(self, ch: str, events: list[Event]) -> None:
        """One char in one of the format's own modes (between the opener, the calls and the end)."""
        raise NotImplementedError

    def _starts_bare_call(self, ch: str) -> bool:
        """Whether `ch` in text mode starts a call without the opener."""
        return False

    # -- shared machinery ---------------------------------------------------------------------
    def _feed_char(self, ch: str, events: list[Event]) -> None:
        if self._finished:
            raise RuntimeError("ToolCallParser.feed after flush/finish")
        if self.mode == "text":
            self._feed_text(ch, events)
        elif self.mode == "obj":
            self._feed_obj(ch, events)
        else:
            self._opening += ch
            self._feed_format(ch, events)

    def _feed_text(self, ch: str, events: list[Event]) -> None:
        if self._starts_bare_call(ch):
            self.pending = ""
            self._opening = ch
            self._start_call()
            return
        self.pending += ch
        if self.pending.endswith(self.opener):
            before = self.pending[: -len(self.opener)]
            if not (self._between_calls and not before.strip(JSON_WS)):
                self._emit_content(before, events)
            self._between_calls = False
            self.pending = ""
            self._opening = self.opener
            self.mode = self.after_opener_mode

    def _feed_obj(self, ch: str, events: list[Event]) -> None:
        obj = self._obj
        assert obj is not None
        try:
            consumed = obj.feed(ch)
        except ValueError:  # the call as written so far is content (vLLM's parsers: when json.loads fails)
            self._recover(self._opening + obj.raw, events)
            return
        if obj.done:
            self._complete_call(events)
            self.mode = self.after_call_mode
            if not consumed:
                self._feed_char(ch, events)

    def _emit_content(self, text: str, events: list[Event]) -> None:
        if text:
            self._between_calls = False
            self.content_parts.append(text)
            events.append(ContentDelta(text))

    def _flush_content(self, events: list[Event], final: bool) -> None:
        if self.mode != "text" or not self.pending:
            return
        if final:  # after complete calls, whitespace or the next call's opener cut off by max_tokens: not content
            rest = self.pending.lstrip(JSON_WS)
            if self.calls and self._between_calls and self.opener.startswith(rest):
                self.truncated = self.truncated or bool(rest)
            else:
                self._emit_content(self.pending, events)
            self.pending = ""
            return
        if self._between_calls and not self.pending.strip(JSON_WS):
            return
        keep = partial_marker_suffix(self.pending, [self.opener])
        emit = self.pending[: len(self.pending) - keep]
        if self._between_calls and not emit.strip(JSON_WS):
            return  # whitespace before what may be the next call: hold it
        self._emit_content(emit, events)
        self.pending = self.pending[len(emit):]

    def _flush_args(self, events: list[Event]) -> None:
        obj = self._obj
        if obj is None or obj.name is None:
            return
        if not self._announced or obj.args_pending:  # a call's first delta carries its id and name
            first, self._announced = not self._announced, True
            events.append(ToolCallDelta(index=self._call_index, arguments_delta=obj.args_pending,
                                        id=self._call_id if first else None, name=obj.name if first else None))
            obj.args_pending = ""

    def _start_call(self) -> None:
        self.mode = "obj"
        self._obj = CallObjectScanner(self.args_keys)
        self._call_index += 1
        self._call_id = new_call_id(self.fmt)
        self._announced = False

    def _complete_call(self, events: list[Event]) -> None:
        obj = self._obj
        assert obj is not None
        self._flush_args(events)
        if obj.name is None:
            self.truncated = True  # a call without a name cannot be returned
        else:
            args = obj.args_final
            if args is None:  # no arguments key: an empty object
                args = "{}"
                events.append(ToolCallDelta(index=self._call_index, arguments_delta=args))
            self.calls.append(ToolCall(id=self._call_id, name=obj.name, arguments_json=args))
        self._obj = None
        self._opening = ""

    def _recover(self, text: str, events: list[Event]) -> None:
        """Malformed call text (only possible without a constraint): keep it as content."""
        if self._obj is not None:
            self._obj = None
            self.truncated = True
        self.mode = "text"
        self.pending += text


class HermesToolParser(ToolCallParser):
    """`<tool_call>\\n{...}\\n</tool_call>` blocks after optional text."""

    fmt = "hermes"
    opener = HERMES_OPEN
    after_opener_mode = "open"
    after_call_mode = "close"
    unclosed_modes = ("open", "close")

    def __init__(self, fmt: str, tools: Optional[Sequence[Any]] = None, *, bare_calls: bool = True) -> None:
        super().__init__(fmt, tools, bare_calls=bare_calls)
        self._close_buf = ""       # what has arrived of the closing tag
        self._ws_after_block = ""  # whitespace after a block: content only if text follows

    def _feed_format(self, ch: str, events: list[Event]) -> None:
        if self.mode == "open":
            if ch in JSON_WS:
                return
            if ch == "{":
                self._start_call()
                return
            self._recover(HERMES_OPEN + ch, events)
        elif self.mode == "close":
            self._feed_close_tag(ch, events)
        else:  # "after_block"
            self._feed_after_block(ch, events)

    def _feed_close_tag(self, ch: str, events: list[Event]) -> None:
        if ch in JSON_WS and not self._close_buf:
            return
        self._close_buf += ch
        if HERMES_CLOSE.startswith(self._close_buf):
            if self._close_buf == HERMES_CLOSE:
                self.mode = "after_block"
                self._close_buf = ""
                self._ws_after_block = ""
            return
        # no closing tag: treat what follows as text
        self.mode = "text"
        text, self._close_buf = self._close_buf, ""
        for c in text:
            self._feed_char(c, events)

    def _feed_after_block(self, ch: str, events: list[Event]) -> None:
        if ch in JSON_WS:
            self._ws_after_block += ch
            return
        self.mode = "text"
        self.pending = self._ws_after_block
        self._ws_after_block = ""
        self._between_calls = True
        self._feed_char(ch, events)


class Llama3JsonToolParser(ToolCallParser):
    """`{"name": ..., "parameters": ...}` as the whole output (or after `<|python_tag|>`), `; `-separated."""

    fmt = "llama3_json"
    opener = PYTHON_TAG
    after_opener_mode = "list"
    after_call_mode = "after_call"
    unclosed_modes = ("list",)

    def _starts_bare_call(self, ch: str) -> bool:
        # a call at the start of the output (after optional whitespace)
        return (self.bare_calls and ch == "{" and not self.content_parts and not self.calls and self._obj is None
                and not self.pending.strip(JSON_WS))

    def _feed_format(self, ch: str, events: list[Event]) -> None:
        if ch in JSON_WS:
            return
        if self.mode == "list" and ch == "{":
            self._start_call()
        elif self.mode == "after_call" and ch == ";":
            self.mode = "list"
        else:
            self._recover(ch, events)


class MistralToolParser(ToolCallParser):
    """`[TOOL_CALLS][{...}, ...]` after optional text."""

    fmt = "mistral"
    opener = MISTRAL_OPEN
    after_opener_mode = "open"
    after_call_mode = "after_call"
    unclosed_modes = ("open", "list", "after_call")

    def _feed_format(self, ch: str, events: list[Event]) -> None:
        if self.mode == "done":  # after the array: text again
            self.mode = "text"
            self._feed_char(ch, events)
        elif ch in JSON_WS:
            return
        elif self.mode == "open":
            if ch == "[":
                self.mode = "list"
            else:
                self._recover(MISTRAL_OPEN + ch, events)
        else:
            self._feed_list(ch, events)

    def _feed_list(self, ch: str, events: list[Event]) -> None:
        """Inside the array: "list" (a call may start) or "after_call" (a separator or the end)."""
        if ch == "]":
            self.mode = "done"
        elif ch == ",":
            self.mode = "list"
        elif ch == "{" and self.mode == "list":
            self._start_call()
        else:
            self._recover(ch, events)


_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,256}")  # what function names are made of (declared ones: any text)
_NAME_PREFIX = re.compile(r"[A-Za-z0-9_.:-]{0,256}")


class MistralV11ToolParser(ToolCallParser):
    """`[TOOL_CALLS]name[ARGS]{...}` per call (tokenizer v11 on): after the opener the name runs up to `[ARGS]`,
    the arguments object follows (streamed as it arrives), another call starts with the opener again."""

    fmt = "mistral_v11"
    opener = MISTRAL_OPEN
    after_opener_mode = "name"
    after_call_mode = "text"  # the next call starts with the opener again
    unclosed_modes = ("name", "args")

    def __init__(self, fmt: str, tools: Optional[Sequence[Any]] = None, *, bare_calls: bool = True) -> None:
        super().__init__(fmt, tools, bare_calls=bare_calls)
        self._name_buf = ""
        self._name = ""
        functions = [t.get("function", t) if isinstance(t, dict) else None for t in tools or []]
        self._declared = {f["name"] + MISTRAL_ARGS for f in functions if isinstance(f, dict) and isinstance(f.get("name"), str)}

    def _may_continue(self, buf: str) -> bool:  # whether what followed the opener can still become `name[ARGS]`
        head, bracket, tail = buf.partition("[")
        plain = bool(_NAME_PREFIX.fullmatch(head)) and (not bracket or MISTRAL_ARGS.startswith(bracket + tail))
        return plain or any(d.startswith(buf) for d in self._declared)

    def _feed_format(self, ch: str, events: list[Event]) -> None:
        if self.mode == "name":
            self._feed_name(ch, events)
        elif ch == "{":
            self._start_call()
        elif ch not in JSON_WS:
            self._recover(ch, events)

    def _recover(self, text: str, events: list[Event]) -> None:
        if self.mode in ("args", "obj"):  # the whole call as written so far is content
            text = MISTRAL_OPEN + self._name + MISTRAL_ARGS + (self._obj.args_raw if self._obj is not None else text)
        super()._recover(text, events)

    def _feed_name(self, ch: str, events: list[Event]) -> None:
        self._name_buf += ch
        if self._name_buf.endswith(MISTRAL_ARGS) and (self._name_buf in self._declared
                                                       or _NAME.fullmatch(self._name_buf[:-len(MISTRAL_ARGS)])):
            self._name, self._name_buf = self._name_buf[:-len(MISTRAL_ARGS)], ""
            self.mode = "args"
        elif not self._may_continue(self._name_buf):
            text, self._name_buf = MISTRAL_OPEN + self._name_buf, ""
            self._recover(text, events)

    def _start_call(self) -> None:
        super()._start_call()
        self._obj = ArgumentsObjectScanner(self._name)

    def _complete_call(self, events: list[Event]) -> None:
        super()._complete_call(events)
        self._between_calls = True  # whitespace before the next call's opener is no content


PARSERS: dict[str, type[ToolCallParser]] = {
    "hermes": HermesToolParser, "llama3_json": Llama3JsonToolParser, "mistral": MistralToolParser,
    "mistral_v11": MistralV11ToolParser,
}
