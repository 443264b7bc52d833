"""xgrammar (0.2) matched a negated class byte by byte without UTF-8's limits on a sequence's second byte:
`"pattern": "^[^,]{3}$"` came out as overlong forms (F0 8E B4 92) and surrogates (ED A3 A7), text that
decodes with U+FFFD and breaks the pattern or maxLength. The matcher now clears the tokens that cannot
continue the character its output ends with, also after a rollback and in a copy."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest

from agentserve.grammar.compiler import GrammarCompiler
from agentserve.grammar.interface import allocate_token_bitmask, bitmask_to_ids
from agentserve.grammar.registry import get_backend
from agentserve.grammar.spec import ConstraintSpec
from agentserve.testing.tiny import tiny_model_cached
from helpers.grammar_walks import available_backends, random_walk, tokenizer_info_for

pytestmark = pytest.mark.skipif("xgrammar" not in available_backends(), reason="xgrammar not installed")
SCHEMA = {"type": "string", "pattern": "^[^,]{3}$"}


@pytest.fixture(scope="module")
def compiler() -> GrammarCompiler:
    info = tokenizer_info_for(tiny_model_cached("qwen2"))[1]  # byte-level: every byte is a token
    return GrammarCompiler(get_backend("xgrammar"), info, timeout_s=30.0)


@pytest.mark.parametrize("spec", [ConstraintSpec.json_schema(SCHEMA), ConstraintSpec.regex("[^,]{3}")])
def test_negated_class_outputs_are_utf8(compiler: GrammarCompiler, spec: ConstraintSpec) -> None:
    compiled = compiler.compile(spec)
    info = compiled.tokenizer_info
    for seed in range(200):  # 3 of 300 walks were invalid before
        walk = random_walk(compiled.new_matcher(), random.Random(seed), max_tokens=30)
        if not walk.finished:
            continue
        text = b"".join(info.token_bytes[t] for t in walk.tokens).decode("utf-8")  # strict: raises on bad bytes
        if spec.kind == "json_schema":
            jsonschema.validate(json.loads(text), SCHEMA)


def test_the_tail_follows_rollback_and_copy(compiler: GrammarCompiler) -> None:
    compiled = compiler.compile(ConstraintSpec.json_schema(SCHEMA))
    info = compiled.tokenizer_info
    ids = {b: info.token_bytes.index(b) for b in (b'"', b"\xf0", b"\x8e", b"\x90")}
    matcher = compiled.new_matcher()
    assert matcher.accept_token(ids[b'"']) and matcher.accept_token(ids[b"\xf0"])
    assert not matcher.accept_token(ids[b"\x8e"])  # F0 8E: an overlong form
    bitmask = allocate_token_bitmask(1, info.vocab_size, pin_memory=False)
    matcher.fill_bitmask(bitmask, 0)
    allowed = set(bitmask_to_ids(bitmask[0], info.vocab_size))
    assert ids[b"\x90"] in allowed and ids[b"\x8e"] not in allowed
    fork = matcher.copy()
    assert fork.accept_token(ids[b"\x90"])
    matcher.rollback(1)  # back to after '"': a continuation byte cannot come first
    assert not matcher.accept_token(ids[b"\x90"])
    assert fork.accept_token(ids[b"\x90"])  # the copy kept its own tail (F0 90 needs two more bytes)
