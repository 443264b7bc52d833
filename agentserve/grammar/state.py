"""Grammar state for the engine: one matcher per constrained sequence, and the batch bitmask.

Per step (see also kernels/token_bitmask.py):

    masks = GrammarBitmask(vocab_size, max_batch)                   # once per engine
    rows = [(i, req.grammar) for i, req in enumerate(batch) if req.grammar is not None]
    filled = masks.fill(rows, batch_size=len(batch))                # None: nothing constrained
    if filled is not None:
        apply_token_bitmask(logits, filled.to(logits.device, non_blocking=True), masks.indices(logits.device))
    ... sample ...
    for each constrained request: req.grammar.accept_token(sampled)  # False: engine bug (mask)
        if req.grammar.is_terminated(): finish with "stop"
    at max_tokens: finish_reason = req.grammar.finish_reason(hit_length=True)  # "length" unless complete

Speculative decoding: `fill_with_draft` fills one row per draft position (the state after
accepting the draft prefix), then restores the state; after verification the engine accepts
only the accepted tokens (or `copy()` the state for the draft model's own use).
"""

from __future__ import annotations

from typing import Optional, Sequence

import llguidance
import torch

from agentserve.grammar.interface import CompiledGrammar, GrammarMatcher, allocate_token_bitmask, bitmask_words
from agentserve.grammar.llguidance_backend import LLGuidanceMatcher


class GrammarState:
    """The grammar side of one sequence."""

    def __init__(self, matcher: GrammarMatcher, grammar: Optional[CompiledGrammar] = None) -> None:
        self.matcher = matcher
        self.grammar = grammar
        self.rejected = 0  # tokens refused by the matcher (must stay 0 when masks are applied)

    @classmethod
    def from_compiled(cls, grammar: CompiledGrammar) -> "GrammarState":
        return cls(grammar.new_matcher(), grammar)

    # -- per step -------------------------------------------------------------------------------
    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_bitmask(bitmask, row)

    def accept_token(self, token_id: int) -> bool:
        ok = self.matcher.accept_token(token_id)
        if not ok:
            self.rejected += 1
        return ok

    def accept_tokens(self, token_ids: Sequence[int]) -> int:
        n = self.matcher.accept_tokens(token_ids)
        if n < len(token_ids):
            self.rejected += 1
        return n

    def rollback(self, num_tokens: int) -> None:
        self.matcher.rollback(num_tokens)

    def copy(self) -> "GrammarState":
        return GrammarState(self.matcher.copy(), self.grammar)

    def fill_with_draft(self, bitmask: torch.Tensor, first_row: int, draft_tokens: Sequence[int]) -> int:
        """Rows first_row .. first_row + len(draft): the mask before each draft position and after
        the last. Returns how many draft tokens the grammar allows (a prefix); rows past the first
        refused token repeat the mask of the refused position (the verifier rejects there)."""
        self.matcher.fill_bitmask(bitmask, first_row)
        accepted = 0
        for j, tok in enumerate(draft_tokens):
            if not self.matcher.accept_token(tok):
                for k in range(j + 1, len(draft_tokens) + 1):
                    bitmask[first_row + k].copy_(bitmask[first_row + j])
                break
            accepted += 1
            self.matcher.fill_bitmask(bitmask, first_row + j + 1)
        if accepted:
            self.matcher.rollback(accepted)
        return accepted

    # -- completion -----------------------------------------------------------------------------
    def is_complete(self) -> bool:
        """The output so far is complete and valid for the constraint (EOS allowed or taken)."""
        return self.matcher.is_accepting()

    def is_terminated(self) -> bool:
        """No further token is possible (EOS accepted, or the grammar ended): finish "stop"."""
        return self.matcher.is_terminated()

    def finish_reason(self, hit_length: bool) -> str:
        """The finish reason of a constrained output that stops now.

        "stop" when the grammar has terminated (EOS taken, or nothing can follow); "length" when
        max_tokens / the context ran out first — even if the text so far happens to be complete
        (`is_complete()` tells), a cut-off constrained output is never reported as a normal stop."""
        if self.is_terminated():
            return "stop"
        return "length" if hit_length else "stop"


class GrammarBitmask:
    """A reusable (pinned, when CUDA is around) CPU bitmask for the constrained rows of a batch.

    `fill` writes each constrained row and sets unconstrained rows to all-allowed; it returns
    None when no row is constrained, so unconstrained batches pay nothing."""

    def __init__(self, vocab_size: int, max_batch: int = 256) -> None:
        self.vocab_size = vocab_size
        self.words = bitmask_words(vocab_size)
        self._buf = allocate_token_bitmask(max(1, max_batch), vocab_size)
        self._rows: list[int] = []
        self._llg_executor: Optional[llguidance.LLExecutor] = None

    def _ensure(self, batch: int) -> None:
        if self._buf.shape[0] < batch:
            self._buf = allocate_token_bitmask(max(batch, 2 * self._buf.shape[0]), self.vocab_size)

    def fill(self, rows: Sequence[tuple[int, GrammarState]], batch_size: Optional[int] = None
             ) -> Optional[torch.Tensor]:
        """Bitmask [batch_size, words] for the batch: row i filled from its state, other rows -1.
        Returns a view of the internal buffer (valid until the next fill), or None."""
        if not rows:
            self._rows = []
            return None
        n = batch_size if batch_size is not None else max(r for r, _ in rows) + 1
        self._ensure(n)
        bm = self._buf[:n]
        constrained = {r for r, _ in rows}
        if len(constrained) < n:
            bm.fill_(-1)
        self._rows = sorted(constrained)
        self._fill_rows(rows, bm)
        return bm

    def _fill_rows(self, rows: Sequence[tuple[int, GrammarState]], bm: torch.Tensor) -> None:
        llg = [(s.matcher, r) for r, s in rows if isinstance(s.matcher, LLGuidanceMatcher)]
        if len(llg) > 1:
            if self._llg_executor is None:
                self._llg_executor = llguidance.LLExecutor()
            LLGuidanceMatcher.fill_many(llg, bm, self._llg_executor)
        for r, s in rows:
            if len(llg) > 1 and isinstance(s.matcher, LLGuidanceMatcher):
                continue
            s.fill(bm, r)

    def indices(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Row indices that the last `fill` constrained (for apply_token_bitmask)."""
        return torch.tensor(self._rows, dtype=torch.long, device=device)
