"""A reply's text into content and tool calls: one implementation for the HTTP adapter, session turns
and stateless gRPC Generate.

The grammar package's parser (`agentserve.grammar.tool_parser.ToolCallParser`) reads the model's tool-call
format (Hermes/Qwen `<tool_call>`, Llama 3.1 JSON, Mistral `[TOOL_CALLS]`, detected from the chat
template). It needs the format's call opener in the text it reads; when the opener is a special token
the engine's detokenizer would skip it, so either the request keeps special tokens
(`opener_is_special`, the HTTP adapter) or the reply is decoded a second time with them kept
(`ReplyStream`, sessions and gRPC).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Collection, Optional, Sequence, Union

from agentserve.chat.reasoning import ReasoningSpan
from agentserve.engine.detokenizer import IncrementalDetokenizer
from agentserve.grammar.reasoning import ReasoningMarkers
from agentserve.grammar.tokenizer_info import special_tokens
from agentserve.grammar.tool_call_object import ContentDelta, ToolCallDelta
from agentserve.grammar.tool_formats import FORMAT_MARKERS, detect_tool_format
from agentserve.grammar.tool_parser import ToolCallParser
from agentserve.outputs import RequestOutput
from agentserve.sampling_params import SamplingParams

ReplyEvent = Union[ContentDelta, ToolCallDelta]


@dataclass
class CallDelta:
    index: int
    id: str
    name: str
    arguments_delta: str


def tool_format_of(tokenizer: Any) -> Optional[str]:
    """The chat template's tool-call format, or None without a tokenizer or chat template."""
    template = tokenizer.chat_template if tokenizer is not None else None
    return detect_tool_format(template) if template else None


def opener_is_special(tokenizer: Any, fmt: str) -> bool:
    """Whether a marker of the format's calls is a special token (Mistral's [TOOL_CALLS] and [ARGS], Llama's
    <|python_tag|>), which skip_special_tokens would drop from the text the parser reads."""
    if tokenizer is None:
        return False
    special = set(special_tokens(tokenizer).values())
    return any(marker in special for marker in FORMAT_MARKERS.get(fmt, ()))


class ReplyParser:
    """Reply text in, events out (ContentDelta / ToolCallDelta, in order); `finish()` gives the
    content and the calls as OpenAI tool_call dicts: the complete ones, then a call cut off by the
    end of the reply (max_tokens) as far as it got — streams have sent its fragments already, and the
    client decides what to do with it (the finish_reason says "length").
    `typed_answer`: tools beside a json_schema / json_object final answer (see ToolCallParser)."""

    def __init__(self, fmt: str, tools: Optional[Sequence[Any]], typed_answer: bool = False) -> None:
        self._parser = ToolCallParser(fmt, tools, bare_calls=not typed_answer)

    def feed(self, text: str) -> list[ReplyEvent]:
        return self._parser.feed(text)

    def flush(self) -> list[ReplyEvent]:
        """End of the reply: text held back as a possible opener that turned out not to be one."""
        return self._parser.flush()

    @property
    def cut_off(self) -> bool:
        """After flush() or finish(): whether the reply ended inside a call (its arguments incomplete)."""
        return self._parser.partial_call is not None

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        content, calls = self._parser.finish()
        partial = self._parser.partial_call
        return content, [c.to_openai() for c in calls + ([partial] if partial is not None else [])]


ReplyPiece = Union[str, CallDelta]


def ordered_pieces(events: Sequence[ReplyEvent]) -> list[ReplyPiece]:
    """The events in the order the reply wrote them: runs of text joined, calls as CallDelta (an output of
    several tokens, e.g. a speculative run, may hold text and then a call: the stream keeps that order)."""
    pieces: list[ReplyPiece] = []
    for e in events:
        if isinstance(e, ContentDelta):
            if pieces and isinstance(pieces[-1], str):
                pieces[-1] += e.text
            elif e.text:
                pieces.append(e.text)
        else:
            pieces.append(CallDelta(e.index, e.id or "", e.name or "", e.arguments_delta or ""))
    return pieces


class ReplyStream:
    """Sessions and Generate: feed each RequestOutput of a reply, get its text and call deltas in order;
    `final()` gives (content, OpenAI tool_call dicts) once the reply finished. Without tools (or with
    tool_choice "none", or no chat template) the engine's own text deltas pass through."""

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams,
                 tools: Optional[list[dict[str, Any]]], eos_token_ids: Collection[int],
                 reasoning: Optional[ReasoningMarkers] = None) -> None:
        self.eos_token_ids = eos_token_ids
        fmt = tool_format_of(tokenizer) if tools and params.tool_choice != "none" else None
        self.parser = ReplyParser(fmt, tools, params.typed_answer) if fmt is not None else None
        self.raw: Optional[IncrementalDetokenizer] = None
        self.raw_text = ""
        # With a reasoning parser, calls are parsed from the answer only: the thinking passes through verbatim.
        self.span = (ReasoningSpan(reasoning.parser, not reasoning.ended_in(prompt_token_ids))
                     if self.parser is not None and reasoning is not None else None)
        self.reasoning_text = ""
        # Special reasoning markers ([THINK]) must reach the reasoning split: the reply is decoded with them kept.
        if self.parser is not None or (reasoning is not None and reasoning.special):
            self.raw = IncrementalDetokenizer(tokenizer, list(prompt_token_ids), False, list(params.stop or []),
                                              params.include_stop_str_in_output, params.min_tokens,
                                              params.spaces_between_special_tokens)
        self._stopped = False

    @property
    def parses_tools(self) -> bool:
        return self.parser is not None

    def feed(self, out: RequestOutput) -> list[ReplyPiece]:
        comp = out.outputs[0]
        if self.raw is None:
            return [comp.delta_text]
        ids = list(comp.delta_token_ids)
        if out.finished and ids and comp.ends_on_stop_token(self.eos_token_ids):
            ids = ids[:-1]  # the stop token (EOS): not part of the reply's text
        for t in ids:
            if not self._stopped and self.raw.append(t) is not None:
                self._stopped = True
        text = self.raw.take_new_text(out.finished)
        if self.parser is None:  # kept only for the reasoning markers
            self.raw_text += text
            return [text]
        events: list[ReplyEvent] = []
        if self.span is not None:
            thinking, text = self.span.feed(text, out.finished)
            self.reasoning_text += thinking
            events.append(ContentDelta(thinking))
        events += self.parser.feed(text)
        if out.finished:
            events += self.parser.flush()
        return ordered_pieces(events)

    def final(self) -> tuple[Optional[str], list[dict[str, Any]]]:
        """(content, tool calls) after the last feed; content None when the engine's own text stands."""
        if self.parser is None:
            return (self.raw_text if self.raw is not None else None), []
        content, calls = self.parser.finish()
        return content_beside_calls(self.reasoning_text + content, bool(calls)), calls


def content_beside_calls(content: str, has_calls: bool) -> str:
    """Beside tool calls, whitespace-only text is no content: OpenAI's chat completions give null (the HTTP
    API does), the proto its empty string. Applied to a thinking reply's answer after the split too."""
    return "" if has_calls and not content.strip() else content
