"""Seeded random sampling with speculation draws from the target's distribution: the tokens at the
positions verified speculatively have the same distribution as without speculation (chi-square test
of homogeneity per position, several temperatures and top-k / top-p / min-p), for the n-gram proposer
(point-mass proposals) and a draft model (the target with noisy weights) sampling from its own distribution q (acceptance
min(1, p/q) and the residual norm(max(p - q, 0)) both exercised). A seeded request is reproducible,
alone or in another batch."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from agentserve import SamplingParams
from agentserve.llm import LLM
from agentserve.testing import tiny_model_cached
from helpers.spec_models import noisy_draft

scipy_stats = pytest.importorskip("scipy.stats")

ARCH = "qwen2"
PROMPT = [5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7]
NUM_SAMPLES = 500
MAX_TOKENS = 4
SETTINGS = [dict(temperature=1.0, top_k=4), dict(temperature=0.7, top_k=8, top_p=0.8),
            dict(temperature=1.5, top_k=6, min_p=0.1)]


def proposer(kind: str) -> dict[str, Any]:
    if kind == "ngram":
        return dict(speculative_method="ngram", prompt_lookup_min=1, spec_dynamic=False)
    return dict(draft_model=noisy_draft(ARCH), spec_dynamic=False)


def sample(setting: dict[str, Any], spec: dict[str, Any]) -> tuple[list[list[int]], LLM]:
    llm = LLM(str(tiny_model_cached(ARCH)), device="cpu", dtype="float32", max_num_seqs=128,
              num_blocks=2048, **spec)
    params = [SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, seed=1000 + i, **setting)
              for i in range(NUM_SAMPLES)]
    outs = llm.generate([PROMPT] * NUM_SAMPLES, params)
    return [o.outputs[0].token_ids for o in outs], llm


@pytest.mark.parametrize("kind", ["ngram", "draft"])
@pytest.mark.parametrize("setting", SETTINGS, ids=["t1-topk", "t07-topp", "t15-minp"])
def test_speculative_sampling_keeps_the_distribution(setting: dict[str, Any], kind: str) -> None:
    plain, _ = sample(setting, {})
    speculative, llm = sample(setting, proposer(kind))
    m = llm.engine.metrics
    assert m.spec_num_drafts > NUM_SAMPLES // 4  # many rows verified drafts
    assert m.spec_num_accepted_tokens > 0
    if kind == "draft":  # q != p: acceptance min(1, p/q) and the residual draw both happen
        assert m.spec_num_accepted_tokens < m.spec_num_draft_tokens
    for position in range(1, MAX_TOKENS):  # position 0 comes from the prefill step, never speculative
        a = Counter(t[position] for t in plain)
        b = Counter(t[position] for t in speculative)
        tokens = sorted(set(a) | set(b))
        table = [[a[t] for t in tokens], [b[t] for t in tokens]]
        _, p_value, _, _ = scipy_stats.chi2_contingency(table)
        assert p_value > 1e-3, f"position {position}: {dict(a)} vs {dict(b)} (p = {p_value:.2g})"


def test_a_seeded_request_is_reproducible_alone_and_in_a_batch() -> None:
    spec = proposer("draft")
    path = str(tiny_model_cached(ARCH))
    mine = SamplingParams(temperature=1.0, top_k=20, max_tokens=24, ignore_eos=True, seed=42)
    alone = LLM(path, device="cpu", dtype="float32", **spec).generate([PROMPT], mine)[0].outputs[0].token_ids
    again = LLM(path, device="cpu", dtype="float32", **spec).generate([PROMPT], mine)[0].outputs[0].token_ids
    assert alone == again
    others = [SamplingParams(temperature=1.0, max_tokens=24, ignore_eos=True) for _ in range(3)]
    batch = LLM(path, device="cpu", dtype="float32", **spec).generate(
        [PROMPT[:5], PROMPT, PROMPT[2:], PROMPT[:9]], [others[0], mine, others[1], others[2]])
    assert batch[1].outputs[0].token_ids == alone
