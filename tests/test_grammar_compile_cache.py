"""The grammar compile cache holds what a client's distinct schemas cost: entries bounded per backend by
what one costs (a count of 1,024 for every backend let an outlines server hold ~38 GiB of indexes), and a
cached failure is its message, handed to each caller as a fresh exception (the cached instance kept the
compile's frames and grew its traceback with every raise)."""

from __future__ import annotations

import pytest

from agentserve import SamplingParams
from agentserve.grammar.compiler import GrammarCompiler
from agentserve.grammar.interface import GrammarError
from agentserve.grammar.registry import get_backend
from agentserve.grammar.spec import ConstraintSpec
from agentserve.llm import LLM
from agentserve.testing import tiny_model_cached
from helpers.grammar_walks import tokenizer_info_for


@pytest.mark.parametrize("backend,entries", [("outlines", 32), ("xgrammar", 128), ("llguidance", 512)])
def test_each_backends_compile_cache_is_sized_by_what_an_entry_costs(backend: str, entries: int) -> None:
    llm = LLM(str(tiny_model_cached("qwen2")), device="cpu", grammar_backend=backend)
    llm.generate([5, 6], SamplingParams(max_tokens=1, json_schema={"type": "object"}))  # builds the compiler
    assert llm.engine.constraints is not None
    assert llm.engine.constraints.compiler.cache_size == entries == get_backend(backend).cache_entries
    llm.close()


def test_a_cached_failure_is_a_fresh_exception_for_each_caller() -> None:
    _, info = tokenizer_info_for(tiny_model_cached("llama3"))
    comp = GrammarCompiler(get_backend("auto"), info, max_workers=1, timeout_s=10)
    bad = ConstraintSpec.regex("(unclosed")
    with pytest.raises(GrammarError):
        comp.submit(bad).result(timeout=5)
    first, second = comp.submit(bad).exception(), comp.submit(bad).exception()
    assert isinstance(first, GrammarError) and str(first) == str(second) and first is not second
    assert first.__traceback__ is None and first.__context__ is None
