"""How requests get their matchers: llguidance matchers built fresh from the grammar text (their
parallel fills scale; deep copies of one template share lexer state and do not) unless the grammar
is slow to build, on a worker thread when the compile finishes (ConstraintManager.submit ->
PreparedGrammar), one per sequence."""

from __future__ import annotations

import concurrent.futures
import json
import random
import threading

import pytest

from agentserve.engine.constraints import ConstraintManager, PreparedGrammar
from agentserve.grammar import llguidance_backend
from agentserve.grammar.interface import allocate_token_bitmask, bitmask_to_ids
from agentserve.grammar.registry import get_backend
from agentserve.grammar.spec import ConstraintSpec
from agentserve.grammar.state import GrammarBitmask, GrammarState
from agentserve.request import Request, RequestStatus
from agentserve.sampling_params import SamplingParams
from agentserve.testing.tiny import tiny_model_cached
from helpers.grammar_walks import tokenizer_info_for

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                           "unit": {"enum": ["c", "f"]}}, "required": ["city", "days"]}


@pytest.fixture(scope="module")
def tok_and_info():
    return tokenizer_info_for(tiny_model_cached("llama3"))


@pytest.fixture(scope="module")
def tok_info(tok_and_info):
    return tok_and_info[1]


@pytest.fixture(scope="module")
def compiled(tok_info):
    backend = get_backend("llguidance")
    return backend.compile(ConstraintSpec("json_schema", json.dumps(SCHEMA)), tok_info)


def _walk(states: list[GrammarState], vocab: int, steps: int, seed: int) -> list[list[int]]:
    """Advances each state by `steps` random allowed tokens (row i: its own walk); returns the
    allowed ids of each row at every step, filled as the engine fills a batch."""
    rng = random.Random(seed)
    bitmask = GrammarBitmask(vocab, max_batch=len(states))
    seen: list[list[int]] = []
    for _ in range(steps):
        bm = bitmask.fill(list(enumerate(states)))
        assert bm is not None
        for i, state in enumerate(states):
            allowed = bitmask_to_ids(bm[i:i + 1], vocab)
            seen.append(allowed)
            if state.is_terminated():
                continue
            choices = [t for t in allowed if t not in state.matcher.tokenizer_info.eos_token_ids] or allowed
            assert state.accept_token(rng.choice(choices))
    return seen


def test_fresh_matchers_fill_as_template_copies(compiled, tok_info, monkeypatch) -> None:
    # The same random walks over 6 rows (one batch fill per step, llguidance's parallel path): fresh
    # matchers and template copies allow exactly the same tokens at every step.
    vocab = tok_info.vocab_size
    monkeypatch.setattr(llguidance_backend, "MATCHER_MODE", "copy")
    copies = _walk([GrammarState.from_compiled(compiled) for _ in range(6)], vocab, 12, seed=3)
    monkeypatch.setattr(llguidance_backend, "MATCHER_MODE", "fresh")
    fresh_states = [GrammarState.from_compiled(compiled) for _ in range(6)]
    assert len({id(s.matcher._m) for s in fresh_states}) == 6
    fresh = _walk(fresh_states, vocab, 12, seed=3)
    assert fresh == copies
    assert any(len(ids) < vocab for ids in fresh)  # the grammar constrained something


def test_fresh_matchers_are_independent(compiled, tok_info, monkeypatch) -> None:
    monkeypatch.setattr(llguidance_backend, "MATCHER_MODE", "fresh")
    a, b = GrammarState.from_compiled(compiled), GrammarState.from_compiled(compiled)
    vocab = tok_info.vocab_size
    mask = allocate_token_bitmask(1, vocab)
    b.fill(mask, 0)
    start = bitmask_to_ids(mask, vocab)
    assert a.accept_token(start[0])  # a moves on; b must not
    a.fill(mask, 0)
    assert bitmask_to_ids(mask, vocab) != start
    b.fill(mask, 0)
    assert bitmask_to_ids(mask, vocab) == start


def test_auto_builds_fresh_matchers_only_for_grammars_that_build_fast(compiled, monkeypatch) -> None:
    # A huge schema can take tens of ms to build (26 ms for a 157 KB one): its requests get copies.
    monkeypatch.setattr(llguidance_backend, "MATCHER_MODE", "auto")
    assert 0 < compiled.build_ms <= llguidance_backend.FRESH_MAX_BUILD_MS
    assert compiled.builds_fresh_matchers()
    monkeypatch.setattr(llguidance_backend, "FRESH_MAX_BUILD_MS", compiled.build_ms / 2)
    assert not compiled.builds_fresh_matchers()
    monkeypatch.setattr(llguidance_backend, "MATCHER_MODE", "fresh")
    assert compiled.builds_fresh_matchers()


def _request(rid: str, params: SamplingParams) -> Request:
    return Request(rid, [1, 2, 3], params)


def test_submit_prepares_one_matcher_per_request_off_the_engine_thread(tok_and_info) -> None:
    tokenizer, tok_info = tok_and_info
    manager = ConstraintManager(tokenizer, tok_info.vocab_size,
                                frozenset(tok_info.eos_token_ids), "llguidance", max_batch=4)
    try:
        params = SamplingParams(max_tokens=8, json_schema=SCHEMA)
        future = manager.submit(params)
        prepared = future.result(timeout=30)
        assert isinstance(prepared, PreparedGrammar)
        built_by = {t.name for t in threading.enumerate() if t.name.startswith("agentserve-matcher")}
        assert built_by  # the builder thread exists: the matcher was not built on this thread
        # Two sequences of one request (n = 2) share the future: each gets its own matcher.
        first, second = _request("r-0", params), _request("r-1", params)
        for req in (first, second):
            req.status = RequestStatus.WAITING_FOR_GRAMMAR
            assert ConstraintManager.attach(req, future) is None
            assert req.status == RequestStatus.WAITING
        assert first.grammar is not None and second.grammar is not None
        assert first.grammar.matcher is not second.grammar.matcher
        assert first.grammar.grammar is second.grammar.grammar is prepared.compiled
    finally:
        manager.close()


def test_a_failed_compile_reaches_attach_as_the_requests_error(tok_and_info) -> None:
    tokenizer, tok_info = tok_and_info
    manager = ConstraintManager(tokenizer, tok_info.vocab_size,
                                frozenset(tok_info.eos_token_ids), "llguidance", max_batch=4)
    try:
        params = SamplingParams(max_tokens=8, regex="(unclosed")
        future = manager.submit(params)
        concurrent.futures.wait([future], timeout=30)
        req = _request("bad", params)
        req.status = RequestStatus.WAITING_FOR_GRAMMAR
        error = ConstraintManager.attach(req, future)
        assert error is not None and "could not be compiled" in error
        assert req.grammar is None
    finally:
        manager.close()


def test_a_cancelled_compile_fails_the_request_instead_of_hanging(tok_and_info, monkeypatch) -> None:
    tokenizer, tok_info = tok_and_info
    manager = ConstraintManager(tokenizer, tok_info.vocab_size, frozenset(tok_info.eos_token_ids), "llguidance",
                                max_batch=4)
    cancelled: concurrent.futures.Future = concurrent.futures.Future()
    monkeypatch.setattr(manager.compiler, "submit", lambda spec: cancelled)
    try:
        params = SamplingParams(max_tokens=8, json_schema=SCHEMA)
        future = manager.submit(params)
        assert cancelled.cancel()
        concurrent.futures.wait([future], timeout=5)
        req = _request("cancelled", params)
        error = ConstraintManager.attach(req, future)
        assert error is not None and "cancelled" in error
    finally:
        manager.close()
