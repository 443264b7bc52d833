"""Output logprobs on the Responses API: `include: ["message.output_text.logprobs"]` (OpenAI's and
vLLM's switch) or `top_logprobs` > 0 (a request for alternatives is a request for logprobs), with
`top_logprobs` alternatives per token (0 to the server's --max-logprobs).

They ride on the message's `output_text` part (`logprobs`: token, logprob, bytes, top_logprobs, as
chat completions' `logprobs.content`) and on each `response.output_text.delta`: the tokens of a text
delta are the tokens generated since the previous delta. Tokens whose text never reaches the message
(a reasoning model's thinking, a tool call's markup and arguments) carry none, as OpenAI shows no
logprobs on those items; tokens that produced no text yet (half a multi-byte character, a possible
tool-call opener held back) go with the next text delta, or, at the end, with the message's last.
"""

from __future__ import annotations

from typing import Any, Optional

from agentserve.adapters.openai.logprobs import LogprobFormatter
from agentserve.adapters.openai.protocol import OpenAIError
from agentserve.outputs import PositionLogprobs
from agentserve.sessions.types import TextEvent

OUTPUT_TEXT_LOGPROBS = "message.output_text.logprobs"
Entry = dict[str, Any]


def requested_top_logprobs(extra: dict[str, Any], limit: int) -> Optional[int]:
    """How many alternatives per token the request asks for, or None when it asks for no logprobs.
    `extra`: the request's fields outside the model (include and top_logprobs are read only here)."""
    include = extra.get("include")
    if include is not None and not (isinstance(include, list) and all(isinstance(x, str) for x in include)):
        raise OpenAIError(400, "include must be a list of strings (e.g. [\"message.output_text.logprobs\"])",
                          param="include")
    top = extra.get("top_logprobs")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= limit):
        raise OpenAIError(400, f"top_logprobs must be an integer in [0, {limit}], got {top!r}", param="top_logprobs")
    if include is not None and OUTPUT_TEXT_LOGPROBS in include:
        return top or 0
    return top if top else None


class MessageLogprobs:
    """Follows a turn's events and hands each text delta of the message the logprobs of its tokens."""

    def __init__(self, formatter: LogprobFormatter, top_n: int) -> None:
        self.formatter, self.top_n = formatter, top_n
        self.message: list[Entry] = []  # every entry given to the message so far
        self._held_ids: list[int] = []  # tokens with no text yet
        self._held: list[PositionLogprobs] = []
        self._in_call = False  # a tool call is being written: tokens without text are its own

    def text(self, event: TextEvent) -> list[Entry]:
        """The logprobs for `event`'s message text (empty when it adds none: they are held for the next)."""
        parts = event.parts  # with a reasoning parser: the thinking's tokens are apart, and carry none
        ids, logprobs = (event.token_ids, event.logprobs) if parts is None else \
            (parts.content_token_ids, parts.content_logprobs)
        if logprobs is not None:
            self._held_ids += ids
            self._held += logprobs
        if parts.content if parts is not None else event.text:
            self._in_call = False
            return self._flush()
        if self._in_call:
            self._drop()  # a tool call's tokens
        return []

    def tool_call(self) -> None:
        """A tool call began or grew: the tokens held so far were its markup, not message text."""
        self._in_call = True
        self._drop()

    def finish(self) -> list[Entry]:
        """At the end: the tokens still held (the stop token, text the detokenizer kept back) go with
        the message's last text, when the reply ended in it. Returns them; `message` has them too."""
        return self._flush() if self.message and not self._in_call else []

    def _flush(self) -> list[Entry]:
        entries = self.formatter.chat(self._held_ids, self._held, self.top_n)
        self._drop()
        self.message += entries
        return entries

    def _drop(self) -> None:
        self._held_ids, self._held = [], []
