"""Constrained outputs after a reasoning block (vLLM's `--reasoning-parser`): a model that thinks first
(Qwen3, DeepSeek-R1: `<think> ... </think>`) writes its reasoning freely, and the request's constraint
(JSON schema, tool calls, regex, grammar) applies from the token after `</think>` on. Without this, a
constraint from the first token forbids the thinking the model was trained to do.

Whether the reasoning already ended in the prompt is vLLM's rule: the last of the two marker tokens in
the prompt decides (`</think>`: ended, e.g. Qwen3 with enable_thinking=False, whose template writes an
empty block; `<think>`, or neither: the reply starts inside the reasoning), read only after the prompt's
last end-of-turn token (the model's EOS ids: `<|im_end|>`, `<|eot_id|>`), as vLLM reads gpt-oss's channels
only in the message being generated. Earlier turns' blocks (a session's resident history, a template that
renders the reasoning of the assistant messages since the last user message, as Qwen3's does in a tool
loop) say nothing about this reply: read whole, their `</think>` made a constrained reply start outside
its reasoning, so the model could not think, and left a thinking_token_budget unenforced. The markers must
each be one token of the tokenizer; a parser whose markers are not is refused at start-up, naming them.

`ReasoningMatcher` wraps the constraint's matcher: while thinking every token but EOS is allowed (a reply
that ends inside its reasoning has no answer; it runs to max_tokens and reports "length"), `</think>`
ends the thinking, and after it every call goes to the inner matcher. Rollback (speculative drafts) and
copy (the draft's own matcher) follow the tokens across the boundary. With a `thinking_token_budget` it also
counts the reasoning and, the budget spent, allows `</think>` alone (grammar/thinking_budget.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from agentserve.grammar.interface import GrammarError, GrammarMatcher, as_int32
from agentserve.grammar.tokenizer_info import special_tokens

# vLLM's parser names -> their (start, end) marker texts.
REASONING_PARSERS: dict[str, tuple[str, str]] = {
    "qwen3": ("<think>", "</think>"),
    "deepseek_r1": ("<think>", "</think>"),
    "mistral": ("[THINK]", "[/THINK]"),  # Magistral (Mistral's tokenizers from v13 on: special tokens)
}


@dataclass(frozen=True)
class ReasoningMarkers:
    parser: str  # a REASONING_PARSERS name (its marker texts are there)
    start_id: int
    end_id: int
    # Whether a marker is a special token (Magistral's [THINK]), which a decode that skips special tokens drops
    # from the text: replies are then decoded with them kept, for the reasoning split to see them.
    special: bool = False
    # The model's end-of-turn tokens (its EOS ids): a prompt's markers count only after the last of them.
    turn_end_ids: frozenset[int] = frozenset()

    @classmethod
    def for_tokenizer(cls, parser: str, tokenizer: Any, turn_end_ids: frozenset[int] = frozenset()) -> "ReasoningMarkers":
        if parser not in REASONING_PARSERS:
            raise GrammarError(f"reasoning_parser {parser!r} is not one of {sorted(REASONING_PARSERS)}")
        start, end = REASONING_PARSERS[parser]
        if tokenizer is None:
            raise GrammarError(f"reasoning_parser {parser!r} needs the model's tokenizer")
        ids = []
        for text in (start, end):
            encoded = tokenizer.encode(text, add_special_tokens=False)
            if len(encoded) != 1:
                raise GrammarError(f"reasoning_parser {parser!r}: {text!r} is not one token of this tokenizer "
                                   f"({encoded}); the model does not use these reasoning markers")
            ids.append(encoded[0])
        return cls(parser, ids[0], ids[1], special=bool(set(ids) & special_tokens(tokenizer).keys()),
                   turn_end_ids=turn_end_ids)

    def reasoning_tokens(self, prompt_token_ids: Sequence[int], output_token_ids: Sequence[int]) -> int:
        """How many output tokens are reasoning (the markers included): usage's reasoning_tokens."""
        reasoning, _, _ = self.split_token_ids(output_token_ids, not self.ended_in(prompt_token_ids))
        return len(reasoning)

    def split_token_ids(self, token_ids: Sequence[int], thinking: bool) -> tuple[list[int], list[int], bool]:
        """(reasoning ids, content ids, whether still thinking after them) of output tokens that start
        `thinking` or not: a start marker opens a block, an end marker closes it, both count as reasoning.
        Fed delta by delta (the returned state into the next call), it splits a stream as
        `reasoning_tokens` counts the whole."""
        reasoning, content, thinking = self.split_positions(token_ids, thinking)
        return [token_ids[i] for i in reasoning], [token_ids[i] for i in content], thinking

    def split_positions(self, token_ids: Sequence[int], thinking: bool) -> tuple[list[int], list[int], bool]:
        """`split_token_ids` as positions in `token_ids` (for what is aligned with them: logprobs)."""
        reasoning: list[int] = []
        content: list[int] = []
        for i, token in enumerate(token_ids):
            if token == self.start_id:
                thinking = True
            (reasoning if thinking else content).append(i)
            if token == self.end_id:
                thinking = False
        return reasoning, content, thinking

    def ended_in(self, prompt_token_ids: Sequence[int]) -> bool:
        """Whether the prompt already closed the reasoning: the last marker after its last end-of-turn token
        is the end."""
        for token in reversed(prompt_token_ids):
            if token == self.start_id or token in self.turn_end_ids:
                return False
            if token == self.end_id:
                return True
        return False


class ReasoningMatcher(GrammarMatcher):
    """`budget` (vLLM's thinking_token_budget): after that many reasoning tokens (a start marker the model
    writes included, the end marker not), the end marker is the only token allowed."""

    def __init__(self, inner: GrammarMatcher, end_id: int, thinking: bool, budget: Optional[int] = None) -> None:
        super().__init__(inner.tokenizer_info)
        self.inner = inner
        self.end_id = end_id
        self.thinking = thinking
        self.budget = budget
        self.thought = 0  # reasoning tokens accepted in this reply (the end marker not counted)
        # Per accepted non-EOS token: whether the inner matcher took it (for rollback across the end marker).
        self._to_inner: list[bool] = []

    def _over_budget(self) -> bool:
        return self.thinking and self.budget is not None and self.thought >= self.budget

    def _accept(self, token_id: int) -> bool:
        if self.thinking:
            if token_id == self.end_id:
                self.thinking = False
            elif self._over_budget():
                return False
            else:
                self.thought += 1
            self._to_inner.append(False)
            return True
        if not self.inner.accept_token(token_id):
            return False
        self._to_inner.append(True)
        return True

    def _fill(self, bitmask: torch.Tensor, row: int) -> None:
        if self._over_budget():
            bitmask[row].zero_()
            bitmask[row, self.end_id // 32] = as_int32(1 << (self.end_id % 32))
        elif self.thinking:
            bitmask[row].fill_(-1)  # EOS is masked after this by the caller (not accepting)
        else:
            self.inner.fill_bitmask(bitmask, row)

    def _rollback(self, num_tokens: int) -> None:
        taken = self._to_inner[-num_tokens:]
        del self._to_inner[-num_tokens:]
        inner = sum(taken)
        if inner:
            self.inner.rollback(inner)
        if not taken[0]:
            # The first token undone was a thinking token: the state is inside the reasoning again
            # (the end marker, if undone, is among them and is not counted; earlier end markers do not exist).
            undone_thoughts = len(taken) - inner - (0 if self.thinking else 1)
            self.thinking = True
            self.thought -= undone_thoughts

    def _copy(self) -> "ReasoningMatcher":
        other = ReasoningMatcher(self.inner.copy(), self.end_id, self.thinking, self.budget)
        other.thought = self.thought
        other._to_inner = list(self._to_inner)
        return other

    def _is_accepting(self) -> bool:
        return not self.thinking and self.inner.is_accepting()

    def _cannot_continue(self) -> bool:
        # The inner matcher never sees EOS (this wrapper takes it), so its termination is the grammar's end.
        return not self.thinking and self.inner.is_terminated()


def wrap_for_reasoning(matcher: GrammarMatcher, markers: Optional[ReasoningMarkers],
                       prompt_token_ids: Sequence[int], budget: Optional[int] = None) -> GrammarMatcher:
    """The request's matcher, behind a reasoning block (of at most `budget` tokens) when a parser is
    configured and the prompt left the reply inside one."""
    if markers is None or markers.ended_in(prompt_token_ids):
        return matcher
    return ReasoningMatcher(matcher, markers.end_id, thinking=True, budget=budget)
