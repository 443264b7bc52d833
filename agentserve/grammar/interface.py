"""The grammar backend interface: matchers, compiled grammars, backends and the bitmask they fill.

Implementations ({llguidance,outlines,xgrammar}_backend.py) import this module; it imports none of
them (`registry.py` maps backend names to their modules). Constraint specs live in `spec.py`,
tokenizer facts in `tokenizer_info.py`.

The engine's view (see also `state.py` and `compiler.py`):

    spec = ConstraintSpec.from_sampling_params(params, tool_format=fmt)   # None: unconstrained
    info = TokenizerInfo.from_hf(tokenizer, vocab_size=model_vocab, eos_token_ids=eos_ids)  # once
    compiler = GrammarCompiler(get_backend("auto"), info)                 # once per engine
    future = compiler.submit(spec)            # off the step loop; result() -> CompiledGrammar
    matcher = future.result().new_matcher()   # one per sequence
    matcher.fill_bitmask(bitmask, row)        # bitmask: int32 [batch, ceil(vocab/32)], CPU
    matcher.accept_token(token_id)            # after sampling; False: not allowed, state unchanged
    matcher.is_terminated()                   # nothing more can follow: finish ("stop")

Bitmask convention (shared with llguidance/xgrammar): bit `i % 32` of word `i // 32` set means token
`i` is allowed. EOS bits are set only in accepting states; padded ids (model vocab wider than the
tokenizer) and special tokens the grammar does not name are never set.
"""

from __future__ import annotations

import abc
import json
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch

if TYPE_CHECKING:  # pragma: no cover - annotations only: spec and tokenizer_info import this module
    from agentserve.grammar.spec import ConstraintSpec
    from agentserve.grammar.tokenizer_info import TokenizerInfo

# JSON whitespace policy: bounded. Compact and single-spaced JSON (what json.dumps and chat
# templates write for tool calls) fit; unbounded whitespace would let an unsure (or random) model
# pad forever instead of finishing the object. outlines-core: at most one space between JSON
# tokens (this pattern); llguidance: compact or one space after ':' and ','; xgrammar: at most
# one whitespace character (and, for JSON constraints, no raw control characters at all).
JSON_WHITESPACE = r"[ ]?"


class GrammarError(ValueError):
    """A constraint that cannot be compiled (unsupported keyword, bad regex, time-out, ...)."""


def canonical_json(obj: Any) -> str:
    """Compact JSON with key order preserved (property order matters to generation order)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def bitmask_words(vocab_size: int) -> int:
    """int32 words per bitmask row: one bit per token id."""
    return (vocab_size + 31) // 32


def allocate_token_bitmask(batch: int, vocab_size: int, *, pin_memory: Optional[bool] = None) -> torch.Tensor:
    """An int32 [batch, ceil(vocab/32)] CPU bitmask, all tokens allowed (-1)."""
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    try:
        return torch.full((batch, bitmask_words(vocab_size)), -1, dtype=torch.int32, pin_memory=pin_memory)
    except RuntimeError:  # pinning unavailable
        return torch.full((batch, bitmask_words(vocab_size)), -1, dtype=torch.int32)


def as_int32(word: int) -> int:
    """A 32-bit bitmask word as the signed int32 value torch and numpy store."""
    word &= 0xFFFFFFFF
    return word - (1 << 32) if word >= (1 << 31) else word


class GrammarMatcher(abc.ABC):
    """Per-sequence grammar state. Not thread-safe; one owner at a time.

    EOS handling is common to all backends: an EOS token is accepted iff the state is accepting,
    after which the matcher is terminated; `fill_bitmask` sets EOS bits iff `is_accepting()`.
    """

    def __init__(self, tokenizer_info: TokenizerInfo) -> None:
        self.tokenizer_info = tokenizer_info
        self._eos_accepted = False
        self.num_tokens = 0  # tokens accepted (EOS included)

    # -- backend hooks ------------------------------------------------------------------------
    @abc.abstractmethod
    def _accept(self, token_id: int) -> bool:
        """Advance over a non-EOS token; False (state unchanged) if not allowed."""

    @abc.abstractmethod
    def _fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed non-EOS tokens into bitmask[row] (EOS bits are fixed up after)."""

    @abc.abstractmethod
    def _rollback(self, num_tokens: int) -> None: ...

    @abc.abstractmethod
    def _copy(self) -> "GrammarMatcher": ...

    @abc.abstractmethod
    def _is_accepting(self) -> bool: ...

    @abc.abstractmethod
    def _cannot_continue(self) -> bool:
        """True when no non-EOS token can follow (output complete)."""

    # -- public API -----------------------------------------------------------------------------
    def accept_token(self, token_id: int) -> bool:
        """Advance over `token_id`. False if the grammar does not allow it; the state is unchanged."""
        if self._eos_accepted:
            return False
        token_id = int(token_id)
        if token_id in self.tokenizer_info.eos_token_ids:
            if not self._is_accepting():
                return False
            self._eos_accepted = True
            self.num_tokens += 1
            return True
        if not 0 <= token_id < self.tokenizer_info.tokenizer_vocab_size:
            return False
        if self._accept(token_id):
            self.num_tokens += 1
            return True
        return False

    def accept_tokens(self, token_ids: Sequence[int]) -> int:
        """Accept tokens in order until one is refused; returns how many were accepted."""
        n = 0
        for t in token_ids:
            if not self.accept_token(t):
                break
            n += 1
        return n

    def fill_bitmask(self, bitmask: torch.Tensor, row: int = 0) -> None:
        """Fill bitmask[row] (int32, CPU, contiguous rows) with the tokens allowed next."""
        if bitmask.dtype != torch.int32 or bitmask.dim() != 2 or bitmask.device.type != "cpu":
            raise ValueError("bitmask must be a 2-D int32 CPU tensor")
        if bitmask.shape[1] != bitmask_words(self.tokenizer_info.vocab_size):
            raise ValueError(f"bitmask has {bitmask.shape[1]} words per row, expected "
                             f"{bitmask_words(self.tokenizer_info.vocab_size)} for vocab {self.tokenizer_info.vocab_size}")
        if self._eos_accepted:
            bitmask[row].zero_()
        else:
            self._fill(bitmask, row)
        self._fix_eos(bitmask, row, self._eos_accepted or self._is_accepting())

    def _fix_eos(self, bitmask: torch.Tensor, row: int, allow: bool) -> None:
        words, bits = self.tokenizer_info.eos_words()
        arr = bitmask.numpy()
        if allow:
            arr[row, words] |= bits
        else:
            arr[row, words] &= ~bits

    def is_accepting(self) -> bool:
        """The output so far is complete and valid: EOS may be emitted (or was)."""
        return self._eos_accepted or self._is_accepting()

    def is_terminated(self) -> bool:
        """Nothing more can follow: EOS was accepted, or the grammar allows no further token."""
        return self._eos_accepted or (self._is_accepting() and self._cannot_continue())

    def rollback(self, num_tokens: int) -> None:
        """Undo the last `num_tokens` accepted tokens (speculative drafts, jump-forward)."""
        if num_tokens < 0 or num_tokens > self.num_tokens:
            raise ValueError(f"cannot roll back {num_tokens} tokens ({self.num_tokens} accepted)")
        if num_tokens == 0:
            return
        n = num_tokens
        if self._eos_accepted:
            self._eos_accepted = False
            n -= 1
        if n:
            self._rollback(n)
        self.num_tokens -= num_tokens

    def copy(self) -> "GrammarMatcher":
        """An independent matcher in the same state (forks, speculative drafting)."""
        other = self._copy()
        other._eos_accepted = self._eos_accepted
        other.num_tokens = self.num_tokens
        return other


def bitmask_to_ids(row: torch.Tensor, vocab_size: int) -> list[int]:
    bits = (row.to(torch.int64).unsqueeze(-1) >> torch.arange(32)) & 1
    ids = torch.nonzero(bits.flatten()[:vocab_size]).flatten()
    return ids.tolist()


class CompiledGrammar(abc.ABC):
    """A constraint compiled for one tokenizer; immutable, shared by all its matchers."""

    def __init__(self, spec: ConstraintSpec, tokenizer_info: TokenizerInfo, backend_name: str) -> None:
        self.spec = spec
        self.tokenizer_info = tokenizer_info
        self.backend_name = backend_name

    @abc.abstractmethod
    def new_matcher(self) -> GrammarMatcher: ...


class GrammarBackend(abc.ABC):
    name: str = "?"
    # Compiled grammars a compiler keeps (least recently used go): sized by what one costs in this backend,
    # since clients choose how many distinct schemas they send.
    cache_entries: int = 1024

    @abc.abstractmethod
    def compile(self, spec: ConstraintSpec, tokenizer_info: TokenizerInfo) -> CompiledGrammar:
        """Compile `spec`; raises GrammarError naming the cause when it is not supported."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"
