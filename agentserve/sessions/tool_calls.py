"""Streaming tool-call extraction for turns and Generate, over the grammar package's parser.

`make_tool_call_streamer(engine, tools, params)` returns an object with
    feed(text_delta) -> (plain text delta, [ToolCallDelta-like objects with index/id/name/arguments_delta])
    finish(full_text) -> (content without the calls, [OpenAI tool_call dicts])
or None when there is nothing to parse (no tools, tool_choice "none") or when the tool-call parser
(agentserve/grammar/tools.py, being built in the grammar issue) is not available in this build — then
replies are plain text and no tool calls are reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from agentserve.sampling_params import SamplingParams


@dataclass
class ToolCallDelta:
    index: int
    id: str
    name: str
    arguments_delta: str


def _tool_call_format(engine: Any) -> Optional[str]:
    fmt = getattr(engine, "tool_call_format", None)
    if fmt:
        return str(fmt)
    family = getattr(getattr(engine, "arch", None), "family", None)
    return {"qwen2": "hermes", "qwen3": "hermes", "mistral": "mistral", "llama": "llama3_json"}.get(str(family))


def make_tool_call_streamer(engine: Any, tools: Optional[list[dict[str, Any]]], params: SamplingParams) -> Optional[Any]:
    if not tools or params.tool_choice == "none" or getattr(engine, "tokenizer", None) is None:
        return None
    try:
        from agentserve.grammar import tools as grammar_tools  # noqa: F401
    except ImportError:
        return None
    factory = getattr(grammar_tools, "make_session_streamer", None)
    if factory is None:
        return None
    return factory(_tool_call_format(engine), tools, engine.tokenizer)
