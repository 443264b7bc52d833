"""Grammar backends: real-world schemas under random walks, regex/choice/json_object, matcher
copy and rollback, EOS and padding bits, the compile cache/pool, and the engine-side state."""

from __future__ import annotations

import json
import random
import re
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch

from agentserve.grammar.interface import (
    CompiledGrammar,
    GrammarBackend,
    GrammarError,
    allocate_token_bitmask,
    bitmask_to_ids,
)
from agentserve.grammar.registry import get_backend
from agentserve.grammar.spec import ConstraintSpec
from agentserve.grammar.tokenizer_info import TokenizerInfo
from agentserve.grammar.compiler import GrammarCompiler
from agentserve.grammar.state import GrammarBitmask, GrammarState
from helpers.grammar_walks import SchemaWorker, available_backends, random_walk, tokenizer_info_for
from agentserve.sampling_params import SamplingParams
from agentserve.testing.tiny import tiny_model_cached

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "schemas" / "sample.jsonl"
if not SAMPLE.exists():
    SAMPLE = Path("/work/shared/data/schemas/sample.jsonl")


BACKENDS = available_backends()

# Backends reject what they would compile but not enforce (see check_enforceable), so every output
# of every backend must validate; the libraries' own gaps show up as "not covered", never as
# invalid outputs.


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return tiny_model_cached("llama3")


@pytest.fixture(scope="module")
def tok_info(model_dir):
    return tokenizer_info_for(model_dir)


def _sample_subset(n: int = 25) -> list[dict]:
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines() if line.strip()]
    by_subset: dict[str, list[dict]] = {}
    for r in rows:
        by_subset.setdefault(r["subset"], []).append(r)
    # spread over the subsets in proportion, deterministic
    picked: list[dict] = []
    for subset, items in sorted(by_subset.items()):
        k = max(1, round(n * len(items) / len(rows)))
        step = max(1, len(items) // k)
        picked += items[::step][:k]
    return picked[:n]


# --------------------------------------------------------------------------------------------
# Real-world schemas: every output of a random walk through a compiled schema validates
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_schema_sample_random_walks_validate(backend: str, model_dir: Path) -> None:
    rows = _sample_subset(25)
    timeout = 5.0
    results = {}
    # a worker process per backend: a compile past its limit is killed (not covered), not waited on
    with SchemaWorker(backend, model_dir, walks=2, max_tokens=1500) as worker:
        for i, row in enumerate(rows):
            results[row["id"]] = worker.run(i, row["schema"], compile_timeout=timeout, walk_timeout=120)
    compiled = {k: r for k, r in results.items() if r["status"] == "compiled"}
    not_covered = {k: r.get("error", r["status"]) for k, r in results.items() if r["status"] != "compiled"}
    statuses = [w["status"] for r in compiled.values() for w in r["walks"]]
    invalid = {k: [w for w in r["walks"] if w["status"] in ("invalid", "invalid_json", "walk_error")]
               for k, r in compiled.items()}
    invalid = {k: v for k, v in invalid.items() if v}
    report = (f"{backend}: compiled {len(compiled)}/{len(rows)}, walks: "
              + ", ".join(f"{s}={statuses.count(s)}" for s in sorted(set(statuses)))
              + f"; not covered: {sorted(not_covered)}")
    print(report)
    assert not invalid, f"invalid outputs: {json.dumps(invalid, indent=1)[:3000]}\n{report}"
    assert statuses.count("valid") >= len(compiled), report  # most walks finish under the cap
    assert "walk_timeout" not in statuses, report
    if backend == "llguidance":  # the default backend: high coverage, nothing known-invalid
        assert len(compiled) >= 20, report


# --------------------------------------------------------------------------------------------
# regex / choice / json_object
# --------------------------------------------------------------------------------------------


def _walk_texts(compiled: CompiledGrammar, tok, n: int, max_tokens: int = 400) -> list[str]:
    out = []
    for seed in range(n):
        res = random_walk(compiled.new_matcher(), random.Random(seed), max_tokens=max_tokens)
        if res.finished:
            out.append(tok.decode(res.tokens, skip_special_tokens=False))
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_regex_choice_json_object(backend: str, tok_info) -> None:
    tok, info = tok_info
    be = get_backend(backend)
    rx = r"(yes|no)-[a-c]{2,4}\d{1,3}"
    texts = _walk_texts(be.compile(ConstraintSpec.regex(rx), info), tok, 12)
    assert len(texts) == 12 and all(re.fullmatch(rx, t) for t in texts), texts
    choices = ["red", "green", "blue <x>", "rouge"]
    texts = _walk_texts(be.compile(ConstraintSpec.choice(choices), info), tok, 12)
    assert len(texts) == 12 and all(t in choices for t in texts), texts
    texts = _walk_texts(be.compile(ConstraintSpec.json_object(), info), tok, 12, max_tokens=1500)
    assert texts, "no json_object walk finished"
    assert all(isinstance(json.loads(t), dict) for t in texts), texts


@pytest.mark.parametrize("backend", BACKENDS)
def test_invalid_input_is_a_grammar_error(backend: str, tok_info) -> None:
    _, info = tok_info
    be = get_backend(backend)
    with pytest.raises(GrammarError):
        be.compile(ConstraintSpec.regex("(unclosed"), info)
    with pytest.raises(GrammarError):
        ConstraintSpec.json_schema("{not json")


# --------------------------------------------------------------------------------------------
# Matcher semantics: refusals, EOS, padding, copy, rollback
# --------------------------------------------------------------------------------------------

SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 8}, "n": {"type": "integer"},
                         "tags": {"type": "array", "items": {"enum": ["a", "b"]}}},
          "required": ["name", "n"]}


def _mask(matcher, info: TokenizerInfo) -> torch.Tensor:
    bm = allocate_token_bitmask(1, info.vocab_size, pin_memory=False)
    matcher.fill_bitmask(bm, 0)
    return bm[0].clone()


@pytest.mark.parametrize("backend", BACKENDS)
def test_eos_padding_and_refusals(backend: str, tok_info) -> None:
    tok, info = tok_info
    assert info.vocab_size > info.tokenizer_vocab_size  # the tiny model pads its vocabulary
    compiled = get_backend(backend).compile(ConstraintSpec.json_schema(SCHEMA), info)
    m = compiled.new_matcher()
    eos = set(info.eos_token_ids)
    ids = tok.encode('{"name": "ab", "n": 12}', add_special_tokens=False)
    for i, t in enumerate(ids + [None]):
        allowed = set(bitmask_to_ids(_mask(m, info), info.vocab_size))
        assert not any(a >= info.tokenizer_vocab_size for a in allowed), "padded ids allowed"
        assert (eos <= allowed) == m.is_accepting() and (not (eos & allowed)) == (not m.is_accepting())
        special = info.special_ids - eos
        assert not (allowed & special), "special tokens allowed"
        if t is None:
            break
        before = _mask(m, info)
        bad = next(x for x in range(info.tokenizer_vocab_size) if x not in allowed and x not in eos)
        assert not m.accept_token(bad)  # refused ...
        assert not m.accept_token(info.vocab_size - 1)  # padding refused
        assert torch.equal(_mask(m, info), before)  # ... and the state is unchanged
        if not m.is_accepting():
            assert not m.accept_token(info.eos_token_ids[0])
        assert m.accept_token(t), f"token {i} of a valid output refused"
    assert m.is_accepting() and m.is_terminated()  # after "}" nothing but EOS can follow
    assert m.accept_token(info.eos_token_ids[-1])
    assert m.is_terminated() and not m.accept_token(ids[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_copy_is_independent(backend: str, tok_info) -> None:
    tok, info = tok_info
    compiled = get_backend(backend).compile(ConstraintSpec.json_schema(SCHEMA), info)
    m = compiled.new_matcher()
    assert m.accept_tokens(tok.encode('{"name": "a', add_special_tokens=False)) > 0
    snapshot = _mask(m, info)
    c = m.copy()
    assert torch.equal(_mask(c, info), snapshot)
    rest_c = tok.encode('b", "n": 1}', add_special_tokens=False)
    assert c.accept_tokens(rest_c) == len(rest_c) and c.is_accepting()
    assert torch.equal(_mask(m, info), snapshot)  # the original did not move
    rest_m = tok.encode('", "n": -5, "tags": ["a"]}', add_special_tokens=False)
    assert m.accept_tokens(rest_m) == len(rest_m) and m.is_accepting()
    assert c.num_tokens != m.num_tokens


@pytest.mark.parametrize("backend", BACKENDS)
def test_rollback_restores_state(backend: str, tok_info) -> None:
    tok, info = tok_info
    compiled = get_backend(backend).compile(ConstraintSpec.json_schema(SCHEMA), info)
    rng = random.Random(0)
    for trial in range(5):
        m = compiled.new_matcher()
        masks = [_mask(m, info)]
        tokens = []
        for _ in range(rng.randint(3, 20)):
            if m.is_terminated():
                break
            allowed = [t for t in bitmask_to_ids(masks[-1], info.vocab_size) if t not in info.eos_token_ids]
            if not allowed:
                break
            t = rng.choice(allowed)
            assert m.accept_token(t)
            tokens.append(t)
            masks.append(_mask(m, info))
        k = len(tokens)
        j = rng.randint(0, k)
        m.rollback(k - j)  # partial rollback: the state after j tokens
        assert torch.equal(_mask(m, info), masks[j])
        m.rollback(j)  # all the way: equals a fresh matcher
        assert torch.equal(_mask(m, info), masks[0]) and m.num_tokens == 0
        assert m.accept_tokens(tokens) == k  # and it can redo the same path
        assert torch.equal(_mask(m, info), masks[-1])
    # EOS is rolled back too
    m = compiled.new_matcher()
    ids = tok.encode('{"name": "x", "n": 0}', add_special_tokens=False)
    assert m.accept_tokens(ids + [info.eos_token_ids[0]]) == len(ids) + 1 and m.is_terminated()
    m.rollback(1)
    assert m.num_tokens == len(ids) and m.is_accepting()
    assert m.accept_token(info.eos_token_ids[0]) and m.num_tokens == len(ids) + 1
    m.rollback(2)  # EOS and "}" (or its last token)
    assert not m.is_accepting() and not m.accept_token(info.eos_token_ids[0])
    with pytest.raises(ValueError):
        m.rollback(len(ids) + 1)


# --------------------------------------------------------------------------------------------
# Compiler: cache, failures, time-outs, the pool
# --------------------------------------------------------------------------------------------


class _SlowBackend(GrammarBackend):
    name = "slow"

    def __init__(self, inner: GrammarBackend, delays: dict) -> None:
        self.inner = inner
        self.delays = delays
        self.calls = 0

    def compile(self, spec, tokenizer_info):
        self.calls += 1
        time.sleep(self.delays.get(spec.payload, 0.0))
        return self.inner.compile(spec, tokenizer_info)


def test_compiler_cache_errors_and_timeouts(tok_info) -> None:
    _, info = tok_info
    slow = ConstraintSpec.regex("slow[0-9]")
    fast = ConstraintSpec.regex("fast[0-9]")
    backend = _SlowBackend(get_backend("auto"), {"slow[0-9]": 1.0})
    comp = GrammarCompiler(backend, info, max_workers=2, timeout_s=0.3)
    f_slow = comp.submit(slow)
    f_fast = comp.submit(fast)
    assert isinstance(f_fast, Future)
    assert isinstance(f_fast.result(timeout=5), CompiledGrammar)  # not stuck behind the slow one
    with pytest.raises(GrammarError, match="timed out"):
        f_slow.result(timeout=5)
    # Sent again while its timed-out compile still runs: refused at once, no second thread on it (one slow
    # schema sent max_stuck times stopped every compile until those ended).
    started = backend.calls
    resent = comp.submit(slow)
    assert resent.done() and "timed out" in str(resent.exception())
    assert backend.calls == started and comp._stuck == 1
    hit = comp.submit(fast)
    assert hit.done() and hit.result() is f_fast.result()  # cached: an already-done future
    calls = backend.calls
    bad = ConstraintSpec.regex("(unclosed")
    with pytest.raises(GrammarError):
        comp.submit(bad).result(timeout=5)
    again = comp.submit(bad)
    assert again.done() and isinstance(again.exception(), GrammarError)  # failures are cached
    assert backend.calls == calls + 1
    time.sleep(1.0)  # the timed-out compile finishes late and fills the cache
    late = comp.submit(slow)
    assert late.done() and isinstance(late.result(), CompiledGrammar)
    assert comp.stats["timeouts"] == 1


def test_compiler_dedups_concurrent_submits(tok_info) -> None:
    _, info = tok_info
    backend = _SlowBackend(get_backend("auto"), {"x+": 0.2})
    comp = GrammarCompiler(backend, info, max_workers=2, timeout_s=10)
    futs = [comp.submit(ConstraintSpec.regex("x+")) for _ in range(5)]
    assert len({id(f) for f in futs}) == 1
    assert isinstance(futs[0].result(timeout=5), CompiledGrammar) and backend.calls == 1


def test_compile_runs_off_the_calling_thread(tok_info) -> None:
    _, info = tok_info
    backend = _SlowBackend(get_backend("auto"), {"y+": 0.5})
    comp = GrammarCompiler(backend, info)
    t0 = time.perf_counter()
    fut = comp.submit(ConstraintSpec.regex("y+"))
    assert time.perf_counter() - t0 < 0.1 and not fut.done()
    fut.result(timeout=5)
    assert threading.current_thread() is threading.main_thread()


# --------------------------------------------------------------------------------------------
# Constraint specs and the engine-side state
# --------------------------------------------------------------------------------------------


def test_constraint_spec_from_sampling_params() -> None:
    assert ConstraintSpec.from_sampling_params(SamplingParams()) is None
    a = ConstraintSpec.from_sampling_params(SamplingParams(json_schema={"type": "object", "properties": {"b": {}, "a": {}}}))
    b = ConstraintSpec.from_sampling_params(SamplingParams(json_schema='{"type":"object","properties":{"b":{},"a":{}}}'))
    assert a == b and hash(a) == hash(b) and a.kind == "json_schema"
    assert list(json.loads(a.payload)["properties"]) == ["b", "a"]  # property order is kept
    assert ConstraintSpec.from_sampling_params(SamplingParams(json_object=True)).kind == "json_object"
    assert ConstraintSpec.from_sampling_params(SamplingParams(regex="a+")) == ConstraintSpec("regex", "a+")
    c = ConstraintSpec.from_sampling_params(SamplingParams(choice=["x", "y"]))
    assert c.kind == "choice" and c.payload == ("x", "y")
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    t = ConstraintSpec.from_sampling_params(SamplingParams(tools=tools, tool_choice="required"), tool_format="hermes")
    assert t.kind == "tool_calls" and json.loads(t.payload)["mode"] == "required"
    assert ConstraintSpec.from_sampling_params(SamplingParams(tools=tools, tool_choice="none"), tool_format="hermes") is None
    with pytest.raises(GrammarError, match="tool_format"):
        ConstraintSpec.from_sampling_params(SamplingParams(tools=tools))


def test_grammar_state_batch_bitmask(tok_info) -> None:
    tok, info = tok_info
    compiled = get_backend("auto").compile(ConstraintSpec.json_schema(SCHEMA), info)
    masks = GrammarBitmask(info.vocab_size, max_batch=2)
    assert masks.fill([], batch_size=4) is None  # unconstrained batch: nothing to do
    s1, s3 = GrammarState.from_compiled(compiled), GrammarState.from_compiled(compiled)
    s3.accept_tokens(tok.encode('{"name"', add_special_tokens=False))
    bm = masks.fill([(1, s1), (3, s3)], batch_size=4)
    assert bm.shape == (4, (info.vocab_size + 31) // 32)
    assert (bm[0] == -1).all() and (bm[2] == -1).all()  # unconstrained rows: all allowed
    assert torch.equal(bm[1], _mask(s1.matcher, info)) and torch.equal(bm[3], _mask(s3.matcher, info))
    assert masks.indices().tolist() == [1, 3]
    # completion and finish reasons
    s = GrammarState.from_compiled(compiled)
    s.accept_tokens(tok.encode('{"name": "x", "n": 1', add_special_tokens=False))
    assert not s.is_complete() and s.finish_reason(hit_length=True) == "length"
    s.accept_tokens(tok.encode("}", add_special_tokens=False))
    assert s.is_complete() and s.is_terminated() and s.finish_reason(hit_length=True) == "stop"
    assert not s.accept_token(tok.encode("x", add_special_tokens=False)[0]) and s.rejected == 1


def test_fill_with_draft_matches_sequential_fills(tok_info) -> None:
    tok, info = tok_info
    compiled = get_backend("auto").compile(ConstraintSpec.json_schema(SCHEMA), info)
    state = GrammarState.from_compiled(compiled)
    state.accept_tokens(tok.encode('{"na', add_special_tokens=False))
    draft = tok.encode('me": "q', add_special_tokens=False)
    bm = allocate_token_bitmask(len(draft) + 1, info.vocab_size, pin_memory=False)
    before = _mask(state.matcher, info)
    assert state.fill_with_draft(bm, 0, draft) == len(draft)
    assert torch.equal(_mask(state.matcher, info), before)  # state restored
    ref = state.copy()
    for j, t in enumerate(draft):
        assert torch.equal(bm[j], _mask(ref.matcher, info))
        ref.accept_token(t)
    assert torch.equal(bm[len(draft)], _mask(ref.matcher, info))
    # a draft the grammar refuses part-way: rows past it repeat the refusing position's mask
    bad = draft[:1] + tok.encode("}}}", add_special_tokens=False)
    bm2 = allocate_token_bitmask(len(bad) + 1, info.vocab_size, pin_memory=False)
    assert state.fill_with_draft(bm2, 0, bad) == 1
    assert torch.equal(bm2[2], bm2[1]) and torch.equal(bm2[-1], bm2[1])
