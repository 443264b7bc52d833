"""Greedy speculative verification in one kernel (kernels/greedy_verify.py): the kernel in Triton's
interpreter against its reference on ragged rows (no drafts, all accepted, a mismatch first or last,
synthetic acceptance flags); the rejection sampler with it on against its general path (the same
outputs, and in synthetic mode the same random draws), taken only where every row is plain greedy; and
greedy outputs with speculation unchanged end to end with it on."""

from __future__ import annotations

import os
from typing import Iterator, Optional

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from agentserve import SamplingParams  # noqa: E402
from agentserve.kernels import greedy_verify as gv  # noqa: E402
from agentserve.llm import LLM  # noqa: E402
from agentserve.sampling.rejection import RejectionSampler  # noqa: E402
from agentserve.sampling.sampler import SamplingMetadata  # noqa: E402
from agentserve.spec.metadata import SpecDecodeMetadata  # noqa: E402
from agentserve.testing import tiny_model_cached  # noqa: E402
from helpers.calls import count_calls  # noqa: E402
from helpers.interpreter import interpreter_only  # noqa: E402
from helpers.spec_models import small_draft  # noqa: E402

CPU = torch.device("cpu")
VOCAB = 50


@pytest.fixture
def greedy_verify_on() -> Iterator[None]:
    before = gv.GREEDY_VERIFY
    gv.set_greedy_verify(True)
    yield
    gv.set_greedy_verify(before)


def _case(seed: int) -> tuple[torch.Tensor, SpecDecodeMetadata, list[list[int]]]:
    """Logits for rows of 0..4 drafts whose drafts copy the argmax for a random prefix, then differ."""
    g = torch.Generator().manual_seed(seed)
    counts = [0, 4, 1, 3, 4, 2]
    logits = torch.randn(sum(c + 1 for c in counts), VOCAB, generator=g)
    greedy = logits.argmax(dim=-1).tolist()
    drafts, at = [], 0
    for c in counts:
        keep = int(torch.randint(0, c + 1, (1,), generator=g))
        drafts.append([greedy[at + j] if j < keep else (greedy[at + j] + 1) % VOCAB for j in range(c)])
        at += c + 1
    return logits, SpecDecodeMetadata.build(drafts, CPU), drafts


def _greedy_meta(rows: int, **extra: object) -> SamplingMetadata:
    return SamplingMetadata(temperature=torch.zeros(rows), all_greedy=True, top_k=None, top_p=None, min_p=None,
                            generators={}, **extra)  # type: ignore[arg-type]


@interpreter_only(gv._greedy_verify_kernel)
def test_rows_wider_than_the_minimum_lanes_and_the_warmup() -> None:
    # 16 drafts (the most num_speculative_tokens allows): width 17 takes the next lane count.
    assert gv.block_width(2) == gv.block_width(16) == gv.MIN_BLOCK_W and gv.block_width(17) == 2 * gv.MIN_BLOCK_W
    drafts = [list(range(1, 17)), list(range(1, 10)) + [0]]
    spec = SpecDecodeMetadata.build(drafts, CPU)
    greedy = torch.tensor(list(range(1, 18)) + list(range(1, 12)))
    args = (greedy, spec.draft_token_ids, None, spec.first_logits_indices, spec.num_draft_tokens_tensor,
            spec.cu_num_draft_tokens, spec.max_spec_len + 1)
    out, accepted = gv.greedy_verify_triton(*args)
    assert accepted.tolist() == [16, 9]
    assert out[0].tolist() == list(range(1, 18)) and out[1, :10].tolist() == list(range(1, 10)) + [10]
    gv.warmup_greedy_verify(CPU, 17)  # both acceptance modes at both lane counts, without error


@interpreter_only(gv._greedy_verify_kernel)
@pytest.mark.parametrize("synthetic", [False, True])
def test_kernel_matches_its_reference(synthetic: bool) -> None:
    for seed in range(4):
        logits, spec, _ = _case(seed)
        greedy = logits.argmax(dim=-1)
        flags: Optional[torch.Tensor] = None
        if synthetic:
            flags = torch.rand(spec.total_num_draft_tokens, generator=torch.Generator().manual_seed(seed)) < 0.6
        args = (greedy, spec.draft_token_ids, flags, spec.first_logits_indices, spec.num_draft_tokens_tensor,
                spec.cu_num_draft_tokens, spec.max_spec_len + 1)
        out, accepted = gv.greedy_verify_triton(*args)
        want_out, want_accepted = gv.greedy_verify_ref(*args)
        assert out.tolist() == want_out.tolist() and accepted.tolist() == want_accepted.tolist()


@pytest.mark.parametrize("synthetic", [None, 0.7])
def test_sampler_matches_its_general_path(greedy_verify_on: None, synthetic: Optional[float]) -> None:
    sampler = RejectionSampler(synthetic_acceptance=synthetic)
    for seed in range(4):
        logits, spec, drafts = _case(seed)
        torch.manual_seed(seed)
        fast = sampler(logits.clone(), spec, _greedy_meta(len(drafts)))
        gv.set_greedy_verify(False)
        torch.manual_seed(seed)
        general = sampler(logits.clone(), spec, _greedy_meta(len(drafts)))
        gv.set_greedy_verify(True)
        assert fast.output_token_ids.tolist() == general.output_token_ids.tolist()
        assert fast.num_accepted.tolist() == general.num_accepted.tolist()
        if synthetic is None:  # the case's rows accept different prefixes: the comparison has teeth
            assert len(set(fast.num_accepted.tolist())) > 1


def test_taken_only_for_plain_greedy_rows(greedy_verify_on: None, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = count_calls(monkeypatch, gv, "greedy_verify")
    logits, spec, drafts = _case(0)
    sampler = RejectionSampler()
    sampler(logits, spec, _greedy_meta(len(drafts), max_num_logprobs=0))
    sampler(logits, spec, _greedy_meta(len(drafts), repetition_penalty=torch.full((len(drafts),), 1.2),
                                       prompt_mask=torch.zeros(len(drafts), VOCAB, dtype=torch.bool),
                                       output_counts=torch.zeros(len(drafts), VOCAB, dtype=torch.int64)))
    assert calls == [0]
    sampler(logits, spec, _greedy_meta(len(drafts)))
    assert calls == [1]


def test_greedy_outputs_with_speculation_unchanged(greedy_verify_on: None) -> None:
    prompts = [[5, 6, 7, 8, 9, 10, 11 + i, 12] for i in range(3)]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    kw = dict(device="cpu", dtype="float32", spec_dynamic=False, num_speculative_tokens=3)
    want = [o.outputs[0].token_ids for o in LLM(str(tiny_model_cached("llama")), device="cpu",
                                                dtype="float32").generate(prompts, params)]
    llm = LLM(str(tiny_model_cached("llama")), draft_model=small_draft("llama"), **kw)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == want
    assert llm.engine.metrics.spec_num_draft_tokens > 0
    llm.close()
