"""Grammar-constrained outputs: JSON schemas, regexes, choices and tool calls.

Imported by module (the package itself imports nothing, so that naming one light module, say the
registry's backend names for the CLI's flags, does not load torch and every backend):

    from agentserve.grammar.compiler import GrammarCompiler
    from agentserve.grammar.registry import get_backend
    from agentserve.grammar.spec import ConstraintSpec
    from agentserve.grammar.state import GrammarBitmask, GrammarState
    from agentserve.grammar.tokenizer_info import TokenizerInfo

See interface.py (matcher / compiled grammar / backend ABCs), spec.py (ConstraintSpec),
tokenizer_info.py, registry.py (backends by name, the default and why), compiler.py (cache, thread
pool, time limit), state.py (per-sequence state, batch bitmask), tool_formats.py / tool_schema.py /
tool_constraint.py / tool_parser.py (tool calls) and kernels/token_bitmask.py (applying the
bitmask to logits).
"""
