"""A reply's reasoning apart from its answer (vLLM's reasoning parsers, `reasoning_content` in chat
replies), decided as the grammar decides where an output constraint starts (grammar/reasoning.py): a reply
starts inside the reasoning when its prompt left a block open (or opened none: Qwen3 in thinking mode
opens it itself), or when it opens one itself; the reasoning runs to `</think>` (a leading `<think>` is not
part of it), the content is the rest. A reply that starts inside the reasoning and never closes it was
cut short while thinking: it is all reasoning. A prompt that closed the block (Qwen3 with thinking off)
gives a reply that is all content, unless the reply opens a block of its own.

`ReasoningStream` splits streamed deltas the same way. A marker is one token, but its text may still arrive
in two deltas: the detokenizer holds back the output's last characters while they may begin a stop string
(engine/detokenizer.py), so the stream holds back text that may begin the end marker likewise;
`ReplyReasoning` splits a stream's token ids along with its text (gRPC's reasoning deltas carry both).
"""

from __future__ import annotations

from typing import Optional, Sequence, TypeVar

from agentserve.grammar.reasoning import REASONING_PARSERS, ReasoningMarkers

T = TypeVar("T")  # what is aligned with a delta's token ids (their logprobs)


def split_reasoning(parser: str, text: str, in_reasoning: bool) -> tuple[Optional[str], str]:
    """(reasoning or None, content) of a whole reply; `in_reasoning`: the prompt left the reply inside a block."""
    start, end = REASONING_PARSERS[parser]
    body = text.lstrip()
    opened = body.startswith(start)
    if not (in_reasoning or opened):
        return None, text
    if opened:
        body = body[len(start):]
    if end not in body:
        return body, ""
    reasoning, content = body.split(end, 1)
    return reasoning, content


class ReasoningStream:
    """One streamed choice: feed(delta) -> (reasoning delta, content delta)."""

    def __init__(self, parser: str, in_reasoning: bool) -> None:
        self.start, self.end = REASONING_PARSERS[parser]
        self.in_reasoning = in_reasoning
        self.decided = False  # whether the reply's first text showed if it opens a block itself
        self.held = ""
        self.pending = ""  # the reasoning's last characters while they may begin the end marker

    def feed(self, delta: str) -> tuple[str, str]:
        if not self.decided:
            self.held += delta
            stripped = self.held.lstrip()
            if len(stripped) < len(self.start) and self.start.startswith(stripped):
                return "", ""  # may still become the start marker: wait for more text
            self.decided = True
            delta, self.held = self.held, ""
            if stripped.startswith(self.start):
                self.in_reasoning = True
                delta = stripped[len(self.start):]
            elif self.in_reasoning:
                delta = stripped  # as split_reasoning: the reasoning starts at the first non-space
        if not self.in_reasoning:
            return "", delta
        text, self.pending = self.pending + delta, ""
        if self.end in text:
            reasoning, content = text.split(self.end, 1)
            self.in_reasoning = False
            return reasoning, content
        keep = _marker_start_len(text, self.end)
        if keep:
            text, self.pending = text[:-keep], text[-keep:]
        return text, ""

    def finish(self) -> tuple[str, str]:
        """Text held back: while undecided (a reply that was only whitespace or the start of the marker), or
        the start of an end marker that never came (a reply cut short while thinking: it is reasoning)."""
        held, self.held = self.held, ""
        pending, self.pending = self.pending, ""
        if self.decided or not held:
            return pending, ""
        self.decided = True
        return (held.lstrip(), "") if self.in_reasoning else ("", held)


class ReasoningSpan:
    """Where a streamed reply's reasoning ends, for a reader that must see only the answer: tool calls are
    parsed from the answer alone (vLLM runs its tool parser on the reasoning parser's content; a call the
    model only drafts while thinking is no call). feed(delta) -> (text still inside the reasoning, verbatim
    with its markers; the answer's text), decided as `split_reasoning` decides; text that may still begin
    a marker is held back until the next delta or the last (`final`)."""

    def __init__(self, parser: str, in_reasoning: bool) -> None:
        self.start, self.end = REASONING_PARSERS[parser]
        self.text = ""  # the reply so far
        self.emitted = 0  # characters of it handed out
        # Replies that start inside a block think from their first character; others decide on their first text.
        self.thinking: Optional[bool] = True if in_reasoning else None
        self.search_from = 0  # where the end marker may start
        self.answer_from: Optional[int] = None

    def feed(self, delta: str, final: bool = False) -> tuple[str, str]:
        self.text += delta
        if self.answer_from is None:
            self._decide(final)
        if self.answer_from is None:
            if final:
                safe = len(self.text)
            elif self.thinking:
                safe = len(self.text) - _marker_start_len(self.text[self.search_from:], self.end)
            else:
                safe = self.emitted  # undecided: all of it may be the start marker
            reasoning, self.emitted = self.text[self.emitted:safe], max(self.emitted, safe)
            return reasoning, ""
        reasoning = self.text[self.emitted:self.answer_from]
        answer = self.text[max(self.emitted, self.answer_from):]
        self.emitted = len(self.text)
        return reasoning, answer

    def _decide(self, final: bool) -> None:
        if self.thinking is None:
            body = self.text.lstrip()
            if body.startswith(self.start):
                self.thinking, self.search_from = True, len(self.text) - len(body) + len(self.start)
            elif not final and len(body) < len(self.start) and self.start.startswith(body):
                return  # may still become the start marker
            else:
                self.thinking, self.answer_from = False, 0
                return
        end_at = self.text.find(self.end, self.search_from)
        if end_at >= 0:
            self.answer_from = end_at + len(self.end)


def _marker_start_len(text: str, marker: str) -> int:
    """The length of the longest end of `text` that begins `marker` (shorter than the marker)."""
    for k in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0


class ReplyReasoning:
    """One streamed reply split into its reasoning and its answer, text and token ids alike: the text as
    `ReasoningStream` splits it, the token ids as `ReasoningMarkers.split_token_ids` (so the reasoning
    deltas' ids add up to usage's reasoning_tokens); `split` does the whole reply as `split_reasoning`."""

    def __init__(self, markers: ReasoningMarkers, prompt_token_ids: Sequence[int]) -> None:
        self.markers = markers
        # Whether the reply starts inside a reasoning block: the rule chat completions and the grammar follow.
        self.in_reasoning = not markers.ended_in(prompt_token_ids)
        self.stream = ReasoningStream(markers.parser, self.in_reasoning)
        self.thinking = self.in_reasoning  # after the token ids fed so far

    def feed(self, delta: str, token_ids: Sequence[int], logprobs: Optional[Sequence[T]] = None
             ) -> tuple[str, str, tuple[int, ...], tuple[int, ...], Optional[tuple[T, ...]], Optional[tuple[T, ...]]]:
        """(reasoning text, content text, reasoning ids, content ids, and the ids' `logprobs` split the
        same way: None without them) of one delta."""
        reasoning_at, content_at, self.thinking = self.markers.split_positions(token_ids, self.thinking)
        reasoning, content = self.stream.feed(delta)
        ids = (tuple(token_ids[i] for i in reasoning_at), tuple(token_ids[i] for i in content_at))
        if logprobs is None:
            return reasoning, content, *ids, None, None
        return reasoning, content, *ids, tuple(logprobs[i] for i in reasoning_at), tuple(logprobs[i] for i in content_at)

    def finish(self) -> tuple[str, str]:
        """Text held back while undecided, as (reasoning, content)."""
        return self.stream.finish()

    def split(self, text: str) -> tuple[str, str]:
        """(reasoning, content) of the whole reply; the reasoning '' when it has none."""
        reasoning, content = split_reasoning(self.markers.parser, text, self.in_reasoning)
        return reasoning or "", content
