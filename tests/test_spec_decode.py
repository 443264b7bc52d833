"""Speculative decoding end to end on the tiny architectures (CPU): greedy outputs with speculation
identical to without, for the n-gram proposer, the target as its own draft (every proposal accepted)
and a different, smaller draft (most proposals rejected; its KV has another shape than the target's),
under chunked prefill, prefix caching, preemption, async scheduling, n > 1 and stops; a vocabulary
mismatch refused at start-up; dynamic k; the counters."""

from __future__ import annotations

import functools
from typing import Any

import pytest

from agentserve import SamplingParams
from agentserve.engine.speculation import choose_num_tokens, expected_tokens
from agentserve.llm import LLM
from agentserve.model.arch_config import ModelLoadError
from agentserve.testing import ARCHS, tiny_model_cached
from helpers.spec_models import small_draft

NEW_TOKENS = 20
# Repetitive prompts, so that n-gram lookup finds matches (the model's continuations decide whether
# they are accepted), and a shared prefix for prefix-cache hits.
SHARED = [5, 6, 7, 8, 9, 10, 5, 6, 7, 8, 9, 10, 5, 6, 7, 8]
PROMPTS = [SHARED + [(3 * i + j) % 7 + 11 for j in range(6 + 7 * i)] for i in range(4)]
# Chunked prefill (budget 16), prefix caching, and 30 pages of 4 tokens for 4 sequences of 42 to 63
# tokens with no output reserve at admission: the pool runs dry and requests are preempted.
ENGINE = dict(device="cpu", dtype="float32", max_num_batched_tokens=16, enable_prefix_caching=True,
              num_blocks=30, block_size=4, decode_reserve_tokens=0)


def proposer(kind: str, arch: str) -> dict[str, Any]:
    if kind == "ngram":
        return dict(speculative_method="ngram", prompt_lookup_min=1)
    draft = str(tiny_model_cached(arch)) if kind == "self" else small_draft(arch)
    return dict(draft_model=draft)


@functools.lru_cache(maxsize=None)
def plain_with_logprobs(arch: str, async_scheduling: bool) -> tuple[tuple[tuple[int, ...], ...], list[list[float]]]:
    llm = LLM(str(tiny_model_cached(arch)), async_scheduling=async_scheduling, **ENGINE)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=1))
    assert llm.engine.metrics.num_preemptions_total > 0  # the setting does preempt
    llm.close()
    return (tuple(tuple(o.outputs[0].token_ids) for o in outs), [sampled_logprobs(o) for o in outs])


def plain(arch: str, async_scheduling: bool) -> tuple[tuple[int, ...], ...]:
    return plain_with_logprobs(arch, async_scheduling)[0]


def sampled_logprobs(out: Any) -> list[float]:
    completion = out.outputs[0]
    return [lp[t].logprob for t, lp in zip(completion.token_ids, completion.logprobs)]


@pytest.mark.parametrize("async_scheduling", [False, True])
@pytest.mark.parametrize("kind", ["ngram", "self", "small"])
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_outputs_identical_with_speculation(arch: str, kind: str, async_scheduling: bool) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=1)
    llm = LLM(str(tiny_model_cached(arch)), async_scheduling=async_scheduling, spec_dynamic=False,
              **{**ENGINE, **proposer(kind, arch)})
    results = llm.generate(PROMPTS, params)
    want_tokens, want_logprobs = plain_with_logprobs(arch, async_scheduling)
    assert [tuple(o.outputs[0].token_ids) for o in results] == list(want_tokens)
    # Logprobs are the target's, whichever position of a verification row the token came from.
    for got, want in zip(map(sampled_logprobs, results), want_logprobs):
        assert got == pytest.approx(want, abs=1e-4)
    m = llm.engine.metrics
    assert m.spec_num_draft_tokens > 0
    if kind == "self":
        assert m.spec_num_accepted_tokens == m.spec_num_draft_tokens  # the target agrees with itself
    elif kind == "small":
        assert m.spec_num_accepted_tokens < m.spec_num_draft_tokens
    llm.engine.pool.check_all_free()
    llm.close()


@pytest.mark.parametrize("kind", ["ngram", "self", "small"])
def test_n_greater_than_one_and_stops_with_speculation(kind: str) -> None:
    arch = "qwen2"
    ref = plain(arch, False)
    stop_token = ref[1][5]
    first_stop = ref[1].index(stop_token)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, n=2, stop_token_ids=[stop_token])
    llm = LLM(str(tiny_model_cached(arch)), **{**ENGINE, **proposer(kind, arch)}, spec_dynamic=False)
    outs = llm.generate(PROMPTS, params)
    for out, expected in zip(outs, ref):
        cut = list(expected[:expected.index(stop_token) + 1]) if stop_token in expected else list(expected)
        assert [c.token_ids for c in out.outputs] == [cut, cut]
    assert outs[1].outputs[0].token_ids == list(ref[1][:first_stop + 1])
    assert outs[1].outputs[0].finish_reason == "stop"
    if kind == "self":  # the siblings' draft starts from the leader's KV in the shared pages: all accepted
        m = llm.engine.metrics
        assert m.spec_num_draft_tokens > 0 and m.spec_num_accepted_tokens == m.spec_num_draft_tokens
    llm.engine.pool.check_all_free()
    llm.close()


def test_stop_strings_with_speculation() -> None:
    arch = "llama"
    base = LLM(str(tiny_model_cached(arch)), device="cpu", dtype="float32")
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    text = base.generate(PROMPTS[:1], params)[0].outputs[0].text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    params = params.clone(stop=[stop])
    want = base.generate(PROMPTS[:1], params)[0].outputs[0]
    llm = LLM(str(tiny_model_cached(arch)), device="cpu", dtype="float32", draft_model=str(tiny_model_cached(arch)),
              spec_dynamic=False)
    got = llm.generate(PROMPTS[:1], params)[0].outputs[0]
    assert got.text == want.text and got.finish_reason == want.finish_reason == "stop"
    assert llm.engine.metrics.spec_num_accepted_tokens > 0


def test_vocabulary_mismatch_is_refused_at_start_up() -> None:
    other = str(tiny_model_cached("mistral"))  # another tokenizer and vocabulary size
    with pytest.raises(ModelLoadError, match="vocabulary"):
        LLM(str(tiny_model_cached("qwen2")), device="cpu", draft_model=other)


def test_config_errors_name_the_fields() -> None:
    path = str(tiny_model_cached("qwen2"))
    with pytest.raises(ValueError, match="draft_model"):
        LLM(path, device="cpu", speculative_method="draft_model")
    with pytest.raises(ValueError, match="prompt_lookup_max"):
        LLM(path, device="cpu", speculative_method="ngram", prompt_lookup_min=4, prompt_lookup_max=2)


def test_dynamic_k_falls_to_zero_at_large_batch() -> None:
    assert expected_tokens(0.0, 4) == 1.0 and expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.8, 4) == pytest.approx(1 + 0.8 + 0.64 + 0.512 + 0.4096)
    assert choose_num_tokens(0.8, 1, 6, 0.15) >= 3          # one stream: speculate deep
    assert choose_num_tokens(0.8, 256, 6, 0.15) == 0        # compute-bound batch: never
    assert choose_num_tokens(0.05, 1, 6, 0.15) == 0         # drafts almost never accepted: never
    # Cheaper proposals go deeper at the same acceptance.
    assert choose_num_tokens(0.6, 8, 6, 0.0) >= choose_num_tokens(0.6, 8, 6, 0.3)


def test_dynamic_speculation_stops_when_proposals_are_rejected() -> None:
    """A small random draft is almost never right: the measured acceptance falls, and k with it."""
    arch = "llama"
    llm = LLM(str(tiny_model_cached(arch)), device="cpu", dtype="float32", draft_model=small_draft(arch))
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    outs = llm.generate(PROMPTS, params)
    assert [tuple(o.outputs[0].token_ids[:NEW_TOKENS]) for o in outs] == list(plain(arch, False))
    spec = llm.engine.spec_proposer
    assert spec is not None and spec.num_tokens_for_step(len(PROMPTS)) == 0
    m = llm.engine.metrics
    assert 0 < m.spec_num_drafts < 40 * len(PROMPTS) // 2  # stopped speculating early on


def test_aborts_mid_speculation_free_every_page() -> None:
    arch = "llama"
    llm = LLM(str(tiny_model_cached(arch)), draft_model=str(tiny_model_cached(arch)), spec_dynamic=False,
              async_scheduling=False, **ENGINE)
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"r{i}", prompt, params)
    for _ in range(4):
        engine.step()
    assert engine.metrics.spec_num_accepted_tokens > 0
    assert engine.abort("r1") and engine.abort("r3")
    finished = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.outputs[0].token_ids
    assert set(finished) == {"r0", "r2"}
    assert [tuple(finished["r0"]), tuple(finished["r2"])] == [plain(arch, False)[0], plain(arch, False)[2]]
    engine.pool.check_all_free()


def test_dynamic_speculation_plans_for_the_batch_being_admitted() -> None:
    """While requests wait for admission the batch is filling up: k is chosen for the batch it grows
    to (here 64 rows: compute-bound, k = 0), not for the few rows running in the first steps. The
    benchmark's batch-256 run speculated in exactly those ramp-up steps (38 rows per run)."""
    arch = "llama"
    llm = LLM(str(tiny_model_cached(arch)), device="cpu", dtype="float32", draft_model=small_draft(arch),
              max_num_seqs=64, max_num_batched_tokens=64)
    engine = llm.engine
    spec = engine.spec_proposer
    assert spec is not None
    asked: list[int] = []
    while_waiting: list[int] = []  # k chosen in steps with requests still waiting
    choose = spec.num_tokens_for_step

    def record(batch_size: int) -> int:
        asked.append(batch_size)
        k = choose(batch_size)
        if engine.scheduler.waiting:
            while_waiting.append(k)
        return k

    spec.num_tokens_for_step = record  # type: ignore[method-assign]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    for i in range(64):  # 16-token prompts, 64 scheduled tokens per step: admission takes many steps
        engine.add_request(f"r{i}", [5 + i % 7] * 16, params)
    engine.step()
    running = engine.scheduler.num_running
    assert running < 64 and asked[0] == 64
    # Planned for the rows running now, the same draft would speculate.
    assert choose_num_tokens(spec.acceptance, running, spec.max_num_tokens, spec.draft_cost) > 0
    while engine.has_unfinished():
        engine.step()
    # No speculation while the batch fills (64 rows are not worth it); the tail, a few rows, may.
    assert len(while_waiting) > 3 and set(while_waiting) == {0}
