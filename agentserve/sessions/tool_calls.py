"""Text and tool-call deltas of a reply, for session turns and stateless Generate.

With tools (and tool_choice other than "none"), a reply is parsed into content and tool calls by the
grammar package's parser (`agentserve.grammar.tool_parser`, format detected from the chat template:
Hermes/Qwen `<tool_call>`, Llama 3.1 JSON, Mistral `[TOOL_CALLS]`). The parser needs the format's
markers, which may be special tokens that the engine's detokenizer skips, so the reply is decoded
here a second time with special tokens kept (stop strings applied; the final stop token, e.g. EOS,
left out). Without tools the engine's own text deltas are passed through.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from agentserve.engine.detokenizer import IncrementalDetokenizer
from agentserve.engine.engine import Engine
from agentserve.outputs import RequestOutput
from agentserve.grammar.tool_formats import detect_tool_format
from agentserve.grammar.tool_parser import SessionToolStreamer, make_session_streamer
from agentserve.sampling_params import SamplingParams


@dataclass
class CallDelta:
    index: int
    id: str
    name: str
    arguments_delta: str


def tool_call_format(tokenizer: Any) -> Optional[str]:
    """The tool-call format the tokenizer's chat template renders; None without a template."""
    if tokenizer is None or not tokenizer.chat_template:
        return None
    return detect_tool_format(tokenizer.chat_template)


def make_tool_call_streamer(engine: Engine, tools: Optional[list[dict[str, Any]]],
                            params: SamplingParams) -> Optional[SessionToolStreamer]:
    """The grammar package's session streamer for this reply, or None (no tools, tool_choice "none",
    no tokenizer or no chat template)."""
    if not tools or params.tool_choice == "none":
        return None
    fmt = tool_call_format(engine.tokenizer)
    return make_session_streamer(fmt, tools, engine.tokenizer) if fmt is not None else None


class ReplyStream:
    """Feed each RequestOutput of a reply; get (text delta, [CallDelta]); `final()` gives
    (content, OpenAI tool_call dicts) once the reply finished."""

    def __init__(self, engine: Engine, prompt_token_ids: list[int], params: SamplingParams,
                 tools: Optional[list[dict[str, Any]]]) -> None:
        self.streamer = make_tool_call_streamer(engine, tools, params)
        self.raw: Optional[IncrementalDetokenizer] = None
        if self.streamer is not None:
            self.raw = IncrementalDetokenizer(engine.tokenizer, list(prompt_token_ids), False, list(params.stop or []),
                                              params.include_stop_str_in_output)
        self._stopped = False

    @property
    def parses_tools(self) -> bool:
        return self.streamer is not None

    def feed(self, out: RequestOutput) -> tuple[str, list[CallDelta]]:
        comp = out.outputs[0]
        if self.streamer is None or self.raw is None:
            return comp.delta_text, []
        ids = list(comp.delta_token_ids)
        if out.finished and comp.finish_reason == "stop" and not isinstance(comp.stop_reason, str) and ids:
            ids = ids[:-1]  # the stop token (EOS): not part of the reply's text
        for t in ids:
            if not self._stopped and self.raw.append(t) is not None:
                self._stopped = True
        text, deltas = self.streamer.feed(self.raw.take_new_text(out.finished))
        if out.finished:
            more_text, more = self.streamer.flush()
            text += more_text
            deltas = list(deltas) + list(more)
        calls = [CallDelta(d.index, d.id or "", d.name or "", d.arguments_delta or "") for d in deltas]
        return text, calls

    def final(self) -> tuple[Optional[str], list[dict[str, Any]]]:
        """(content, tool calls) after the last feed; content None when tools are not parsed."""
        if self.streamer is None:
            return None, []
        content, calls = self.streamer.finish()
        return content, calls
