"""Per-choice progress of a chat completion stream (adapters/openai/chat.py)."""

from __future__ import annotations

from typing import Any, Optional

from agentserve.adapters.openai.tool_chunks import ToolCallChunks
from agentserve.chat.reasoning import ReasoningStream


class ChatStreamState:
    def __init__(self, n: int, tool_streams: list[Optional[ToolCallChunks]], reasoning_parser: Optional[str],
                 in_reasoning: bool, include_usage: bool, continuous: bool) -> None:
        self.include_usage, self.continuous = include_usage, continuous
        self.started = [False] * n
        self.done = [False] * n
        self.sent_lp = [0] * n
        self.completion_tokens = [0] * n
        self.streams = tool_streams
        self.reasoning = [ReasoningStream(reasoning_parser, in_reasoning) if reasoning_parser else None
                          for _ in range(n)]
        self.has_calls = [False] * n
        self.acc = [""] * n  # streamed text per choice, and how much of it went to the tool-call parser
        self.fed = [0] * n
        self.cached = 0
        # return_token_ids: each choice's tokens not yet sent (the next chunk of that choice carries them, so
        # the chunks' token_ids add up to the reply's tokens even where a step's text is held back), and whether
        # the stream's first chunk, which carries the prompt's token ids, has gone.
        self.sent_ids = [0] * n
        self.pending_ids: list[list[int]] = [[] for _ in range(n)]
        self.prompt_ids_sent = False

    def take_new_ids(self, k: int, token_ids: Any) -> None:
        self.pending_ids[k] += list(token_ids[self.sent_ids[k]:])
        self.sent_ids[k] = len(token_ids)
