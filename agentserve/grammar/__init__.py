"""Grammar-constrained outputs: JSON schemas, regexes, choices and tool calls.

    from agentserve.grammar import (ConstraintSpec, TokenizerInfo, GrammarCompiler, GrammarState,
                                    GrammarBitmask, get_backend)

See interface.py (matcher / compiled grammar / backend ABCs), spec.py (ConstraintSpec),
tokenizer_info.py, registry.py (backends by name, the default and why), compiler.py (cache, thread
pool, time limit), state.py (per-sequence state, batch bitmask), tool_formats.py / tool_schema.py /
tool_constraint.py / tool_parser.py (tool calls) and kernels/token_bitmask.py (applying the
bitmask to logits).
"""

from agentserve.grammar.compiler import GrammarCompiler
from agentserve.grammar.interface import (
    CompiledGrammar,
    GrammarBackend,
    GrammarError,
    GrammarMatcher,
    allocate_token_bitmask,
)
from agentserve.grammar.registry import BACKEND_NAMES, DEFAULT_BACKEND, get_backend
from agentserve.grammar.spec import ConstraintSpec
from agentserve.grammar.state import GrammarBitmask, GrammarState
from agentserve.grammar.tokenizer_info import TokenizerInfo

__all__ = [
    "BACKEND_NAMES", "DEFAULT_BACKEND", "CompiledGrammar", "ConstraintSpec", "GrammarBackend", "GrammarError",
    "GrammarMatcher", "TokenizerInfo", "allocate_token_bitmask", "get_backend", "GrammarCompiler",
    "GrammarBitmask", "GrammarState",
]
