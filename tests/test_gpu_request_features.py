"""GPU: the per-request features the CPU suite checks on the torch reference path, through the Triton
kernels, CUDA graphs (decode and the draft's steps replay graphs; verification runs the graph-captured
or the unified kernel) and async scheduling, where the CPU cannot reach: prompt logprobs (against the
CPU engine on the same fp32 weights, beside speculating rows), allowed_token_ids, bad_words and
logit_bias beside unrestricted rows, with and without speculation (greedy identical to the CPU engine).
Run with `pytest -m gpu`."""

from __future__ import annotations

import math
from typing import Any, Optional

import pytest
import torch

from agentserve import SamplingParams
from agentserve.llm import LLM
from agentserve.outputs import Logprob
from agentserve.sampling.bad_words import bad_words_token_ids
from agentserve.testing import tiny_model_cached

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SHARED = [5, 6, 7, 8, 9, 10, 5, 6, 7, 8, 9, 10, 5, 6, 7, 8]
PROMPTS = [SHARED + [(3 * i + j) % 7 + 11 for j in range(6 + 7 * i)] for i in range(4)]
ALLOWED = [5, 6, 7, 8, 19, 23, 101, 250, 311]


def _gpu(arch: str, **kw: Any) -> LLM:
    return LLM(str(tiny_model_cached(arch)), device="cuda", dtype="float32", max_num_seqs=16, max_model_len=512,
               gpu_memory_utilization=0.3, enable_prefix_caching=True, **kw)


def _cpu(arch: str) -> LLM:
    return LLM(str(tiny_model_cached(arch)), device="cpu", dtype="float32", num_blocks=256, max_model_len=512)


def _spec(kind: Optional[str], arch: str) -> dict[str, Any]:
    if kind is None:
        return {}
    if kind == "ngram":
        return dict(speculative_method="ngram", prompt_lookup_min=1, num_speculative_tokens=3, spec_dynamic=False)
    return dict(draft_model=str(tiny_model_cached(arch)), num_speculative_tokens=3, spec_dynamic=False)


def _close_positions(got: Optional[list[Optional[dict[int, Logprob]]]],
                     want: Optional[list[Optional[dict[int, Logprob]]]]) -> None:
    assert got is not None and want is not None and len(got) == len(want) and got[0] is None
    for g, w in zip(got[1:], want[1:]):
        assert g is not None and w is not None
        for tid, lp in w.items():
            # fp32 on both devices: the scored token and the top ones agree to rounding (a near-tie may
            # swap two top tokens, so tokens missing on one side must be within rounding of the cut).
            if tid in g:
                assert math.isclose(g[tid].logprob, lp.logprob, abs_tol=2e-3), (tid, g[tid], lp)
            else:
                assert lp.rank > 1 and min(x.logprob for x in g.values()) >= lp.logprob - 2e-3


@pytest.mark.parametrize("spec", [None, "self"])
@pytest.mark.parametrize("async_scheduling", [False, True])
def test_prompt_logprobs_match_the_cpu_engine(spec: Optional[str], async_scheduling: bool) -> None:
    arch = "llama3"
    ref = _cpu(arch)
    scored = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, prompt_logprobs=3, logprobs=2)
    plain = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    # Every other request scores its prompt; the others (and, with a draft, their speculation) run beside.
    params = [scored if i % 2 == 0 else plain for i in range(len(PROMPTS))]
    want = ref.generate(PROMPTS, params)
    ref.close()
    llm = _gpu(arch, async_scheduling=async_scheduling, **_spec(spec, arch))
    for _ in range(2):  # the second time the prompts' pages are cached (unscored positions only)
        got = llm.generate(PROMPTS, params)
        for g, w, p in zip(got, want, params):
            assert g.outputs[0].token_ids == w.outputs[0].token_ids
            if p.prompt_logprobs is None:
                assert g.prompt_logprobs is None
            else:
                _close_positions(g.prompt_logprobs, w.prompt_logprobs)
                for gl, wl, tid in zip(g.outputs[0].logprobs, w.outputs[0].logprobs, w.outputs[0].token_ids):
                    assert math.isclose(gl[tid].logprob, wl[tid].logprob, abs_tol=2e-3)
    if spec is not None:
        assert llm.engine.metrics.spec_num_draft_tokens > 0
    llm.engine.pool.check_all_free()
    llm.close()


@pytest.mark.parametrize("spec", [None, "ngram", "self"])
def test_token_restrictions_match_the_cpu_engine(spec: Optional[str]) -> None:
    """allowed_token_ids, bad_words and logit_bias rows beside an unrestricted one, greedy: the same tokens
    as the CPU engine, async scheduling and CUDA graphs on the GPU."""
    arch = "qwen2"
    ref = _cpu(arch)
    greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    plain = [list(o.outputs[0].token_ids) for o in ref.generate(PROMPTS, greedy)]
    # Ban the token row 1 starts with (as a word: its text); force a token row 2 would not pick first.
    word = ref.tokenizer.decode([plain[1][0]]).strip()
    seqs = bad_words_token_ids(ref.tokenizer, [word], ref.engine.arch.vocab_size)
    pushed = next(t for t in ALLOWED if t != plain[2][0])
    params = [greedy.clone(allowed_token_ids=ALLOWED), greedy.clone(bad_words=[word]),
              greedy.clone(logit_bias={pushed: 100.0}), greedy]
    want = [list(o.outputs[0].token_ids) for o in ref.generate(PROMPTS, params)]
    ref.close()
    assert all(t in ALLOWED for t in want[0])
    assert not any(want[1][i:i + len(s)] == s for s in seqs for i in range(len(want[1])))
    assert all(w != p for w, p in zip(want[:3], plain[:3])) and want[3] == plain[3]  # each restriction bites
    llm = _gpu(arch, async_scheduling=True, **_spec(spec, arch))
    got = [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, params)]
    assert got == want
    if spec is not None:
        assert llm.engine.metrics.spec_num_draft_tokens > 0  # the unrestricted rows speculated
    llm.engine.pool.check_all_free()
    llm.close()
