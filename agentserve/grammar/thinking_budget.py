"""vLLM's `thinking_token_budget` for a reply without an output constraint: the reasoning block
(grammar/reasoning.py's ReasoningMatcher, which counts it) holds at most that many tokens, then its end
marker is the only token the mask allows, and the answer after it is free. A constrained reply gets the
same budget on its own reasoning wrapper (engine/constraints.py `attach`).

The budget needs the server's reasoning parser (the markers); a prompt that already closed the reasoning
(Qwen3 with enable_thinking off) leaves nothing to bound, and the request gets no matcher at all.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from agentserve.grammar.interface import GrammarMatcher
from agentserve.grammar.reasoning import ReasoningMarkers, ReasoningMatcher
from agentserve.grammar.tokenizer_info import TokenizerInfo


class FreeMatcher(GrammarMatcher):
    """Every token allowed in every state, EOS included: the answer after a budgeted reasoning block."""

    def _accept(self, token_id: int) -> bool:
        return True

    def _fill(self, bitmask: torch.Tensor, row: int) -> None:
        bitmask[row].fill_(-1)

    def _rollback(self, num_tokens: int) -> None:
        pass  # no state to undo

    def _copy(self) -> "FreeMatcher":
        return FreeMatcher(self.tokenizer_info)

    def _is_accepting(self) -> bool:
        return True

    def _cannot_continue(self) -> bool:
        return False


def budget_matcher(info: TokenizerInfo, markers: ReasoningMarkers, prompt_token_ids: Sequence[int],
                   budget: int) -> Optional[GrammarMatcher]:
    """The matcher that holds an unconstrained reply's reasoning to `budget` tokens; None when the prompt
    closed the reasoning already."""
    if markers.ended_in(prompt_token_ids):
        return None
    return ReasoningMatcher(FreeMatcher(info), markers.end_id, thinking=True, budget=budget)
