"""Patterns' shorthand classes as both ECMA-262 (JSON Schema's dialect) and Python's re (jsonschema's) read
them (grammar/regex_dialect.py): llguidance wrote the NKo digit U+07C8 for `^\\D{2}$` and Hangul for
`^\\W+$`, which Python reads as a digit and a word character, so jsonschema refused the output."""

from __future__ import annotations

import json
import random
import re

import jsonschema
import pytest

from agentserve.grammar.compiler import GrammarCompiler
from agentserve.grammar.regex_dialect import both_dialects
from agentserve.grammar.registry import get_backend
from agentserve.grammar.spec import ConstraintSpec
from agentserve.testing.tiny import tiny_model_cached
from helpers.grammar_walks import available_backends, decode, random_walk, tokenizer_info_for

# ECMA-262's \s members (Python's differ: no U+FEFF, and U+001C-U+001F, U+0085 besides).
ECMA_SPACE = "\t\n\x0b\x0c\r \xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
PATTERNS = [r"^\D{3}$", r"^\W{3}$", r"^\S{3}$", r"^[^\s]{3}$", r"^[^\d\w]{3}$", r"^[\W\d]{3}$", r"^a\sb$",
            r"^\w\d$", r"^[a\s]{2}$"]


def _ecma(pattern: str) -> str:
    """`pattern` as ECMA reads it, in Python's re (with re.ASCII for \\d and \\w): ECMA's \\s, and \\S outside
    classes (PATTERNS put none inside one)."""
    out, in_class, i = [], False, 0
    while i < len(pattern):
        if pattern.startswith(("\\s", "\\S"), i):
            negated = pattern[i + 1] == "S"
            assert not (in_class and negated)
            out.append(ECMA_SPACE if in_class else f"[{'^' if negated else ''}{ECMA_SPACE}]")
            i += 2
            continue
        in_class = (in_class or pattern[i] == "[") and pattern[i] != "]"
        out.append(pattern[i])
        i += 1
    return "".join(out)


@pytest.fixture(scope="module")
def info():
    return tokenizer_info_for(tiny_model_cached("qwen2"))[1]


@pytest.mark.skipif("llguidance" not in available_backends(), reason="llguidance not installed")
@pytest.mark.parametrize("pattern", PATTERNS)
def test_outputs_match_under_both_readings(info, pattern: str) -> None:
    schema = {"type": "string", "pattern": pattern}
    compiled = GrammarCompiler(get_backend("llguidance"), info, timeout_s=30.0).compile(ConstraintSpec.json_schema(schema))
    walks = [random_walk(compiled.new_matcher(), random.Random(s), max_tokens=12) for s in range(150)]
    values = [json.loads(decode(info, w.tokens)) for w in walks if w.finished]
    assert values
    ecma = re.compile(_ecma(pattern), re.ASCII)
    for value in values:
        jsonschema.validate(value, schema)  # Python's reading
        assert ecma.search(value), (pattern, value)


def test_shorthands_are_narrowed_where_taken_and_widened_where_avoided() -> None:
    assert both_dialects(r"^\d\D$") == r"^[0-9][^0-9\p{Nd}]$"
    assert both_dialects(r"[\w.][^\w.]") == r"[A-Za-z0-9_.][^A-Za-z0-9_\p{L}\p{N}.]"
    assert both_dialects(r"[^\W]") == r"[^[^A-Za-z0-9_]]"
    assert both_dialects(r"\\d\[\d]") == r"\\d\[[0-9]]"  # escaped backslash and bracket stay literal
    assert both_dialects("[]a]") == r"[\]a]"
    assert "\\ufeff" in both_dialects(r"[^\s]") and "\\ufeff" not in both_dialects(r"\s")
