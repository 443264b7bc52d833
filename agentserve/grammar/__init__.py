"""Grammar-constrained outputs: JSON schemas, regexes, choices and tool calls.

    from agentserve.grammar import (ConstraintSpec, TokenizerInfo, GrammarCompiler, GrammarState,
                                    GrammarBitmask, get_backend)

See backend.py (interface, default backend and why), compiler.py (cache, thread pool, time
limit), state.py (per-sequence state, batch bitmask), tools.py (tool-call formats and parsing) and
kernels/token_bitmask.py (applying the bitmask to logits).
"""

from agentserve.grammar.backend import (
    BACKEND_NAMES,
    DEFAULT_BACKEND,
    CompiledGrammar,
    ConstraintSpec,
    GrammarBackend,
    GrammarError,
    GrammarMatcher,
    TokenizerInfo,
    allocate_token_bitmask,
    get_backend,
)
from agentserve.grammar.compiler import GrammarCompiler
from agentserve.grammar.state import GrammarBitmask, GrammarState

__all__ = [
    "BACKEND_NAMES", "DEFAULT_BACKEND", "CompiledGrammar", "ConstraintSpec", "GrammarBackend", "GrammarError",
    "GrammarMatcher", "TokenizerInfo", "allocate_token_bitmask", "get_backend", "GrammarCompiler",
    "GrammarBitmask", "GrammarState",
]
