"""Requests at the edges under speculation (issue #12), each against the same engine without it (greedy,
fp32, CPU): max_tokens 1 and below k, logprobs and prompt_logprobs, stop strings that end inside a run
of accepted drafts (the output is cut exactly where it is without speculation), stop ids under
min_tokens, penalties, logit_bias, allowed_token_ids, n > 1, requests that run into max_model_len
mid-run, and a batch mixing grammar-constrained and free requests; seeded random requests (n > 1)
reproduce. Three proposers: the target as its own draft with k = 10 (long accepted runs), a noisy copy
(some accepted), n-gram lookup with k = 1. Plus the configuration edges: k and prompt-lookup bounds
through the offline API, the CLI and speculative_config, refused with the field named."""

from __future__ import annotations

import functools
from typing import Any, Optional

import pytest

from agentserve import SamplingParams
from agentserve.cli import build_parser, engine_config_from_args
from agentserve.config import EngineConfig
from agentserve.llm import LLM
from agentserve.testing import tiny_model_cached
from helpers.spec_models import noisy_draft

ARCH = "qwen2"
MAX_MODEL_LEN = 40
PROMPTS = [[5, 6, 7, 8, 9, 10, 5, 6, 7, 8], [11, 12, 13, 14, 15, 16, 17], [20, 21, 22, 20, 21]]
ENGINE = dict(device="cpu", dtype="float32", block_size=4, num_blocks=64, max_model_len=MAX_MODEL_LEN)
GREEDY = dict(temperature=0.0, ignore_eos=True)
PROPOSERS: dict[str, dict[str, Any]] = {
    "self_k10": dict(draft_model=str(tiny_model_cached(ARCH)), num_speculative_tokens=10),
    "noisy_k4": dict(num_speculative_tokens=4),  # draft_model filled in lazily (built on first use)
    "ngram_k1": dict(speculative_method="ngram", prompt_lookup_min=1, num_speculative_tokens=1),
}
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "n": {"type": "integer"}},
          "required": ["name", "n"]}

Result = list[list[tuple[list[int], str, Optional[str]]]]


@functools.lru_cache(maxsize=None)
def engine(proposer: Optional[str]) -> LLM:
    """One engine per proposer for the whole module (None: no speculation, the reference)."""
    spec: dict[str, Any] = {}
    if proposer is not None:
        spec = dict(PROPOSERS[proposer], spec_dynamic=False)
        if proposer == "noisy_k4":
            spec["draft_model"] = noisy_draft(ARCH)
    return LLM(str(tiny_model_cached(ARCH)), **ENGINE, **spec)


def generate(proposer: Optional[str], prompts: list[Any], params: Any) -> Result:
    llm = engine(proposer)
    outs = llm.generate(prompts, params)
    llm.engine.pool.check_all_free()
    return [[(list(c.token_ids), c.text, c.finish_reason) for c in o.outputs] for o in outs]


@functools.lru_cache(maxsize=None)
def reference_text() -> str:
    return generate(None, PROMPTS[:1], SamplingParams(max_tokens=16, **GREEDY))[0][0][1]


def stop_string() -> str:
    """Three characters from the middle of the first reference output, with nothing before them that
    could match first."""
    text = reference_text()
    for start in range(len(text) // 3, len(text) - 3):
        stop = text[start:start + 3]
        if text.find(stop) == start and stop.isprintable() and stop.strip():
            return stop
    raise AssertionError(f"no stop string in {text!r}")


def cases() -> dict[str, SamplingParams]:
    first = generate(None, PROMPTS[:1], SamplingParams(max_tokens=16, **GREEDY))[0][0][0]
    stop = stop_string()
    return {
        "max_tokens_1": SamplingParams(max_tokens=1, **GREEDY),
        "max_tokens_below_k": SamplingParams(max_tokens=3, **GREEDY),
        "stop_string": SamplingParams(max_tokens=16, stop=[stop], **GREEDY),
        "stop_string_kept": SamplingParams(max_tokens=16, stop=[stop], include_stop_str_in_output=True, **GREEDY),
        "stop_id_under_min_tokens": SamplingParams(max_tokens=16, stop_token_ids=[first[2]], min_tokens=6, **GREEDY),
        "eos_with_min_tokens": SamplingParams(max_tokens=16, temperature=0.0, min_tokens=3),
        "penalties": SamplingParams(max_tokens=16, repetition_penalty=1.5, presence_penalty=1.0,
                                    frequency_penalty=0.5, **GREEDY),
        "logit_bias": SamplingParams(max_tokens=16, logit_bias={first[3]: 50.0}, **GREEDY),
        "allowed_token_ids": SamplingParams(max_tokens=16, allowed_token_ids=first[:5], **GREEDY),
        "n_2": SamplingParams(max_tokens=8, n=2, **GREEDY),
        "to_max_model_len": SamplingParams(max_tokens=None, **GREEDY),
    }


@pytest.mark.parametrize("proposer", list(PROPOSERS))
def test_request_edges_keep_the_greedy_outputs(proposer: str) -> None:
    for name, params in cases().items():
        want = generate(None, PROMPTS, params)
        assert generate(proposer, PROMPTS, params) == want, name
        if name.startswith("stop_string"):
            assert want[0][0][2] == "stop"  # the stop string does end the first request
        if name == "to_max_model_len":
            assert [len(w[0][0]) for w in want] == [MAX_MODEL_LEN - len(p) for p in PROMPTS]
    m = engine(proposer).engine.metrics
    assert m.spec_num_accepted_tokens > 0


@pytest.mark.parametrize("proposer", ["self_k10", "ngram_k1"])
def test_logprobs_and_prompt_logprobs_are_the_targets(proposer: str) -> None:
    params = SamplingParams(max_tokens=10, logprobs=3, prompt_logprobs=2, **GREEDY)
    want = engine(None).generate(PROMPTS, params)
    got = engine(proposer).generate(PROMPTS, params)
    for g, w in zip(got, want):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        assert g.outputs[0].logprobs is not None and w.outputs[0].logprobs is not None
        for g_top, w_top in zip(g.outputs[0].logprobs, w.outputs[0].logprobs):
            assert set(g_top) == set(w_top)
            assert all(g_top[t].logprob == pytest.approx(w_top[t].logprob, abs=1e-4) for t in w_top)
        assert g.prompt_logprobs is not None and w.prompt_logprobs is not None
        for g_top, w_top in zip(g.prompt_logprobs[1:], w.prompt_logprobs[1:]):
            assert all(g_top[t].logprob == pytest.approx(w_top[t].logprob, abs=1e-4) for t in w_top)


@pytest.mark.parametrize("proposer", ["noisy_k4", "ngram_k1"])
def test_a_batch_mixing_grammar_and_free_requests(proposer: str) -> None:
    prompts = ["Output JSON:", "Hello hello hello hello", "Repeat: a b a b a b", "Answer:"]
    params = [SamplingParams(json_schema=SCHEMA, temperature=0.0, max_tokens=24),
              SamplingParams(max_tokens=24, **GREEDY),
              SamplingParams(regex="(ab|cd)+x", temperature=0.0, max_tokens=24),
              SamplingParams(choice=["yes", "no", "maybe so"], temperature=0.0, max_tokens=8)]
    assert generate(proposer, prompts, params) == generate(None, prompts, params)


def test_seeded_random_n_greater_than_one_reproduces() -> None:
    params = SamplingParams(temperature=1.0, max_tokens=10, n=3, seed=5, ignore_eos=True)
    first = generate("noisy_k4", PROMPTS, params)
    assert generate("noisy_k4", PROMPTS, params) == first
    assert generate("noisy_k4", PROMPTS[1:2], params) == first[1:2]  # alone as in the batch
    assert len({tuple(c[0]) for c in first[0]}) > 1  # the n sequences draw their own tokens


def test_preemption_in_a_tight_pool_with_deep_lookahead() -> None:
    """14 to 20 pages of 4 tokens for 5 sequences of 34 to 54 tokens, k = 16: lookahead slots (and the
    continuation's 2k + 1) compete with decodes, requests are preempted and recomputed, and the
    target as its own draft is still accepted every time."""
    path = str(tiny_model_cached("llama"))
    prompts = [[(5 * i + 3 * j) % 50 + 5 for j in range(10 + 5 * i)] for i in range(5)]
    params = SamplingParams(max_tokens=24, **GREEDY)
    for num_blocks in (14, 20):
        pool = dict(device="cpu", dtype="float32", block_size=4, num_blocks=num_blocks, decode_reserve_tokens=0,
                    enable_prefix_caching=True, max_num_batched_tokens=16)
        plain = LLM(path, **pool)
        want = [o.outputs[0].token_ids for o in plain.generate(prompts, params)]
        plain.close()
        llm = LLM(path, draft_model=path, num_speculative_tokens=16, spec_dynamic=False, **pool)
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == want
        m = llm.engine.metrics
        assert m.spec_num_draft_tokens > 0 and m.spec_num_accepted_tokens == m.spec_num_draft_tokens
        if num_blocks == 14:
            assert m.num_preemptions_total > 0
        llm.engine.pool.check_all_free()
        llm.close()


# --- configuration edges ------------------------------------------------------------------------------

@pytest.mark.parametrize("option,value,message", [
    ("num_speculative_tokens", 0, "greater than 0"),
    ("num_speculative_tokens", -3, "greater than 0"),
    ("num_speculative_tokens", 2.5, "fractional part"),
    ("num_speculative_tokens", "four", "valid integer"),
    ("num_speculative_tokens", True, "num_speculative_tokens must be an integer, got True"),
    ("num_speculative_tokens", 17, "less than or equal to 16"),
    ("prompt_lookup_min", 0, "greater than 0"),
    ("prompt_lookup_max", -1, "greater than 0"),
])
def test_invalid_counts_are_refused_naming_the_field(option: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message) as error:
        EngineConfig.from_kwargs("m", speculative_method="ngram", **{option: value})
    assert option in str(error.value)


@pytest.mark.parametrize("given,expected", [
    (dict(prompt_lookup_min=8), (8, 8)),   # above the default maximum: the maximum follows
    (dict(prompt_lookup_max=1), (1, 1)),   # below the default minimum: the minimum follows
    (dict(prompt_lookup_min=1), (1, 5)),   # no contradiction: the default maximum stays
    (dict(prompt_lookup_min=3, prompt_lookup_max=3), (3, 3)),
])
def test_one_lookup_bound_given_alone(given: dict[str, int], expected: tuple[int, int]) -> None:
    """agentserve's own options take prompt_lookup_min alone (the maximum follows it where the default would
    contradict it); it used to be refused with "prompt_lookup_max (5) must be >= prompt_lookup_min (8)", a 5
    nobody gave. vLLM's speculative_config sets the other bound equal to the one given."""
    config = EngineConfig.from_kwargs("m", speculative_method="ngram", **given)
    assert (config.spec.prompt_lookup_min, config.spec.prompt_lookup_max) == expected
    config = EngineConfig.from_kwargs("m", speculative_config=dict(method="ngram", **given))
    bound = given.get("prompt_lookup_min", given.get("prompt_lookup_max"))
    want = expected if len(given) == 2 else (bound, bound)
    assert (config.spec.prompt_lookup_min, config.spec.prompt_lookup_max) == want
    with pytest.raises(ValueError, match=r"prompt_lookup_max \(2\) must be >= prompt_lookup_min \(4\)"):
        EngineConfig.from_kwargs("m", speculative_method="ngram", prompt_lookup_min=4, prompt_lookup_max=2)


@pytest.mark.parametrize("flags,message", [
    (["--num-speculative-tokens", "0"], "num_speculative_tokens"),
    (["--num-speculative-tokens", "2.5"], "num_speculative_tokens"),
    (["--prompt-lookup-min", "0"], "prompt_lookup_min"),
    (["--speculative-config", '{"method": "ngram", "num_speculative_tokens": -1}'], "num_speculative_tokens"),
])
def test_cli_flags_are_checked_before_the_model_loads(flags: list[str], message: str) -> None:
    args = build_parser().parse_args(["serve", "--model", "m", "--http-port", "0", "--speculative-method", "ngram",
                                      *flags] if "--speculative-config" not in flags else
                                     ["serve", "--model", "m", "--http-port", "0", *flags])
    with pytest.raises(ValueError, match=message):
        engine_config_from_args(args)


def test_ngram_lookup_longer_than_the_prompt_and_k_at_its_limit() -> None:
    """prompt_lookup_max past every prompt's length and k = 16 (the most allowed): exact outputs."""
    llm = LLM(str(tiny_model_cached(ARCH)), **ENGINE, speculative_method="ngram", prompt_lookup_min=1,
              prompt_lookup_max=64, num_speculative_tokens=16, spec_dynamic=False)
    params = SamplingParams(max_tokens=16, **GREEDY)
    got = [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, params)]
    assert got == [r[0][0] for r in generate(None, PROMPTS, params)]
    assert llm.engine.metrics.spec_num_draft_tokens > 0
    llm.close()
