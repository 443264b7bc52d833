"""Speculative verification: greedy is the target's argmax chain, random sampling keeps the target's
distribution, seeded rows reproduce across batch mixes, penalties / bans see the drafts before them."""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from agentserve.sampling.rejection import RejectionSampler, expand_sampling_metadata, num_banned_positions_for
from agentserve.sampling.sampler import Sampler, SamplingMetadata, process_logits
from agentserve.spec.metadata import SpecDecodeMetadata

CPU = torch.device("cpu")


def make_meta(temperature: list[float], top_p: Optional[list[float]] = None,
              generators: Optional[dict[int, torch.Generator]] = None, **extra: object) -> SamplingMetadata:
    return SamplingMetadata(
        temperature=torch.tensor(temperature), all_greedy=all(t == 0 for t in temperature), top_k=None,
        top_p=None if top_p is None else torch.tensor(top_p), min_p=None, generators=generators or {},
        **extra)  # type: ignore[arg-type]


def test_metadata_layout() -> None:
    spec = SpecDecodeMetadata.build([[11, 12, 13], [], [14, 15]], CPU, query_end_loc=[10, 11, 20])
    assert spec.draft_token_ids.tolist() == [11, 12, 13, 14, 15]
    assert spec.num_draft_tokens == [3, 0, 2] and spec.cu_num_draft_tokens.tolist() == [3, 3, 5]
    assert spec.target_logits_indices.tolist() == [0, 1, 2, 5, 6]
    assert spec.bonus_logits_indices.tolist() == [3, 4, 7]
    assert spec.logits_indices.tolist() == [6, 7, 8, 9, 10, 17, 18, 19]  # each row's last k + 1 tokens
    assert spec.logits_row_ids.tolist() == [0, 0, 0, 0, 1, 2, 2, 2]
    assert spec.logits_positions.tolist() == [0, 1, 2, 3, 0, 0, 1, 2]
    assert spec.max_spec_len == 3
    assert SpecDecodeMetadata.build([[1], [2, 3]], CPU).logits_indices.tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="fewer tokens"):
        SpecDecodeMetadata.build([[1, 2]], CPU, query_end_loc=[2])


def greedy_chain_case(seed: int) -> tuple[torch.Tensor, SpecDecodeMetadata, list[list[int]], list[int]]:
    """Random logits; per row the first m drafts follow the argmax chain and draft m (if any) does not."""
    gen = torch.Generator().manual_seed(seed)
    ks, matches = [3, 0, 2, 4, 4, 1], [1, 0, 2, 4, 0, 0]
    logits = torch.randn(sum(k + 1 for k in ks), 20, generator=gen)
    argmax = logits.argmax(-1).tolist()
    drafts, expected, start = [], [], 0
    for k, m in zip(ks, matches):
        chain = argmax[start:start + k + 1]
        row = chain[:m] + ([(chain[m] + 1) % 20] if m < k else [])
        row += [int(t) for t in torch.randint(0, 20, (k - len(row),), generator=gen)]
        drafts.append(row)
        expected.append(chain[:m + 1])
        start += k + 1
    return logits, SpecDecodeMetadata.build(drafts, CPU), expected, matches


@pytest.mark.parametrize("with_draft_probs", [False, True])
def test_greedy_is_the_argmax_chain(with_draft_probs: bool) -> None:
    logits, spec, expected, matches = greedy_chain_case(0)
    draft_probs = torch.rand(spec.total_num_draft_tokens, 20) if with_draft_probs else None
    out = RejectionSampler()(logits, spec, make_meta([0.0] * spec.num_rows), draft_probs)
    assert out.num_accepted.tolist() == matches
    width = spec.max_spec_len + 1
    assert out.output_token_ids.tolist() == [row + [-1] * (width - len(row)) for row in expected]
    # Rows that accepted everything end with the bonus token, scored at their last position.
    bonus = logits[spec.bonus_logits_indices].argmax(-1)
    for row, k in enumerate(spec.num_draft_tokens):
        if matches[row] == k:
            assert out.output_token_ids[row, k] == bonus[row]


def test_logprobs_are_the_targets_at_emitted_positions() -> None:
    logits, spec, expected, _ = greedy_chain_case(1)
    meta = make_meta([0.0] * spec.num_rows, max_num_logprobs=2)
    out = RejectionSampler()(logits * 3, spec, meta)
    assert out.logprobs is not None and out.logprob_token_ids is not None and out.sampled_ranks is not None
    raw = (logits * 3).log_softmax(-1)
    for row, tokens in enumerate(expected):
        first = int(spec.first_logits_indices[row])
        for j, token in enumerate(tokens):
            assert out.logprob_token_ids[row, j, 0] == token
            assert torch.isclose(out.logprobs[row, j, 0], raw[first + j, token])
            assert out.logprob_token_ids[row, j, 1:].tolist() == raw[first + j].topk(2).indices.tolist()
            assert out.sampled_ranks[row, j] == 1  # greedy without penalties: the raw argmax
        assert (out.logprob_token_ids[row, len(tokens):] == -1).all()
        assert torch.isneginf(out.logprobs[row, len(tokens):]).all()


def sequential_greedy(logits: torch.Tensor, meta_for_step: Callable[[list[int]], SamplingMetadata]) -> list[int]:
    """The target decoding one token at a time with the ordinary Sampler (reference for exactness)."""
    chain: list[int] = []
    for j in range(logits.shape[0]):
        chain.append(int(Sampler()(logits[j:j + 1].clone(), meta_for_step(chain)).sampled_token_ids[0]))
    return chain


def test_penalties_count_the_drafts_before_each_position() -> None:
    vocab, k = 12, 4
    torch.manual_seed(3)
    logits = (torch.randn(vocab) * 0.3).expand(k + 1, -1).clone()  # same logits at every position
    logits[:, 5] += 2.0  # token 5 leads until the penalties push it down
    prompt_mask = torch.zeros(1, vocab, dtype=torch.bool)
    prompt_mask[0, [1, 2]] = True
    base_counts = torch.zeros(1, vocab, dtype=torch.int32)
    base_counts[0, 3] = 2
    penalties = dict(repetition_penalty=torch.tensor([1.5]), presence_penalty=torch.tensor([0.5]),
                     frequency_penalty=torch.tensor([1.0]), prompt_mask=prompt_mask)

    def meta_for(generated: list[int]) -> SamplingMetadata:
        counts = base_counts.clone()
        for t in generated:
            counts[0, t] += 1
        return make_meta([0.0], output_counts=counts, **penalties)

    def twice(meta: SamplingMetadata) -> SamplingMetadata:
        # Two identical rows in one batch: the second must not see the first one's drafts.
        return expand_rows(meta, torch.tensor([0, 0]))

    chain = sequential_greedy(logits, meta_for)
    assert len(set(chain)) > 1, "the penalties must change the argmax along the chain"
    sampler = RejectionSampler()
    both = torch.cat([logits, logits])
    exact = sampler(both, SpecDecodeMetadata.build([chain[:k]] * 2, CPU), twice(meta_for([])))
    assert exact.num_accepted.tolist() == [k, k] and exact.output_token_ids.tolist() == [chain, chain]
    # Drafts proposing the unpenalised argmax everywhere: only the first survives, then the chain's.
    naive = sampler(both, SpecDecodeMetadata.build([[5] * k] * 2, CPU), twice(meta_for([])))
    accepted = next(j for j in range(k) if chain[j] != 5)
    assert naive.num_accepted.tolist() == [accepted] * 2
    assert naive.output_token_ids[:, :accepted + 1].tolist() == [chain[:accepted + 1]] * 2


def expand_rows(meta: SamplingMetadata, rows: torch.Tensor) -> SamplingMetadata:
    def pick(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if t is None else t[rows]

    return replace(meta, temperature=meta.temperature[rows], repetition_penalty=pick(meta.repetition_penalty),
                   presence_penalty=pick(meta.presence_penalty), frequency_penalty=pick(meta.frequency_penalty),
                   prompt_mask=pick(meta.prompt_mask), output_counts=pick(meta.output_counts))


def test_min_tokens_bans_cover_only_the_positions_still_short() -> None:
    eos, vocab, k = 0, 10, 3
    logits = torch.randn(2 * (k + 1), vocab, generator=torch.Generator().manual_seed(4))
    logits[:, eos] = 10.0  # EOS leads everywhere
    runner_up = logits[:, 1:].argmax(-1) + 1
    meta = make_meta([0.0, 0.0], banned_rows=torch.tensor([0, 1]), banned_tokens=torch.tensor([eos, eos]))
    # Row 0 has generated 3 of min_tokens 5 (2 positions banned); row 1 has reached min_tokens.
    banned = num_banned_positions_for([3, 5], [5, 5], CPU)
    assert banned.tolist() == [2, 0]
    drafts = [runner_up[:2].tolist() + [eos], runner_up[4:5].tolist() + [eos, eos]]
    out = RejectionSampler()(logits, SpecDecodeMetadata.build(drafts, CPU), meta, num_banned_positions=banned)
    assert out.num_accepted.tolist() == [3, 0]
    assert out.output_token_ids.tolist() == [drafts[0] + [eos], [eos, -1, -1, -1]]
    with pytest.raises(ValueError, match="num_banned_positions"):
        RejectionSampler()(logits, SpecDecodeMetadata.build(drafts, CPU), meta)


def processed_reference(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Temperature then the nucleus: the smallest set of top tokens whose mass reaches top_p."""
    probs = (logits / temperature).softmax(-1)
    order = probs.argsort(descending=True)
    mass_before = probs[order].cumsum(0) - probs[order]
    keep = torch.zeros_like(probs, dtype=torch.bool)
    keep[order[mass_before < top_p]] = True
    kept = torch.where(keep, probs, 0.0)
    return kept / kept.sum()


def chi_square_pvalue(tokens: torch.Tensor, expected: torch.Tensor) -> float:
    counts = torch.bincount(tokens, minlength=expected.shape[0]).double()
    assert counts[expected == 0].sum() == 0, "a token outside the target's support was emitted"
    support = expected > 0
    if int(support.sum()) == 1:
        return 1.0  # one possible token: the support check above is the whole test
    probs = expected[support].double()
    return float(chisquare(counts[support].numpy(), (probs / probs.sum() * counts.sum()).numpy()).pvalue)


VOCAB, K, ROWS = 10, 2, 20000
POSITION_LOGITS = torch.randn(K + 1, VOCAB, generator=torch.Generator().manual_seed(5)) * 1.5
# An arbitrary draft: related to the target (so that later positions are reached often) but far from it.
DRAFT_Q = torch.softmax(POSITION_LOGITS[:K] + torch.randn(K, VOCAB, generator=torch.Generator().manual_seed(6)) * 1.5,
                        -1)


@pytest.mark.parametrize("one_hot_draft", [False, True])
@pytest.mark.parametrize(("temperature", "top_p"), [(0.6, 1.0), (1.0, 1.0), (1.7, 1.0), (0.6, 0.8), (1.0, 0.7),
                                                    (1.7, 0.9)])
def test_random_rows_keep_the_target_distribution(temperature: float, top_p: float, one_hot_draft: bool) -> None:
    torch.manual_seed(7)
    drafts = torch.stack([torch.multinomial(DRAFT_Q[j], ROWS, replacement=True) for j in range(K)], 1)
    # The n-gram case: q is a one-hot on each proposal. How the proposal was chosen does not matter as
    # long as it is independent of the sampler's randomness, so the same drafts serve both cases.
    draft_probs = None if one_hot_draft else DRAFT_Q.repeat(ROWS, 1)
    spec = SpecDecodeMetadata.build(drafts.tolist(), CPU)
    logits = POSITION_LOGITS.repeat(ROWS, 1)
    meta = make_meta([temperature] * ROWS, top_p=[top_p] * ROWS if top_p < 1 else None)
    out = RejectionSampler()(logits, spec, meta, draft_probs)

    accepted, tokens = out.num_accepted, out.output_token_ids
    for j in range(K + 1):
        # Position j is emitted iff drafts 0..j-1 were accepted; given that, it must follow p_j.
        reached = accepted >= j
        assert int(reached.sum()) > 500, f"position {j} reached too rarely to test"
        expected = processed_reference(POSITION_LOGITS[j], temperature, top_p)
        assert chi_square_pvalue(tokens[reached, j], expected) > 1e-3, f"position {j}"
    # The test has power: accepting every draft (emitting q at position 0) fails it.
    wrong = torch.multinomial(DRAFT_Q[0], ROWS, replacement=True)
    with pytest.raises(AssertionError):
        assert chi_square_pvalue(wrong, processed_reference(POSITION_LOGITS[0], temperature, top_p)) > 1e-3


def test_draft_equal_to_target_is_always_accepted() -> None:
    torch.manual_seed(8)
    rows, k = 64, 3
    logits = torch.randn(rows * (k + 1), 30)
    spec_shape = SpecDecodeMetadata.build([[0] * k] * rows, CPU)
    meta = make_meta([0.9] * rows, top_p=[0.95] * rows)
    _, target = process_logits(logits, expand_sampling_metadata(meta, spec_shape))
    assert target is not None
    drafts = torch.multinomial(target[spec_shape.target_logits_indices], 1).reshape(rows, k)
    spec = SpecDecodeMetadata.build(drafts.tolist(), CPU)
    out = RejectionSampler()(logits, spec, meta, target[spec.target_logits_indices])
    assert out.num_accepted.tolist() == [k] * rows
    assert (out.output_token_ids[:, :k] == drafts).all()


def seeded_steps(seed: int, batch_before: int, batch_after: int, steps: int = 6) -> list[list[int]]:
    """A seeded row's outputs over several steps, with unseeded rows of other sizes around it."""
    gen = torch.Generator().manual_seed(seed)
    noise_gen = torch.Generator().manual_seed(1000 + batch_before)  # other rows' content differs per mix
    outputs = []
    for step in range(steps):
        step_gen = torch.Generator().manual_seed(step)  # the seeded row's logits and drafts: same in all mixes
        k = 1 + step % 3
        own_logits = torch.randn(k + 1, 200, generator=step_gen)
        own_drafts = own_logits[:k].argmax(-1).tolist()
        others = [int(torch.randint(0, 4, (1,), generator=noise_gen)) for _ in range(batch_before + batch_after)]
        drafts = ([[1] * n for n in others[:batch_before]] + [own_drafts] + [[2] * n for n in others[batch_before:]])
        spec = SpecDecodeMetadata.build(drafts, CPU)
        parts = [torch.randn(n + 1, 200, generator=noise_gen) for n in others[:batch_before]]
        parts += [own_logits] + [torch.randn(n + 1, 200, generator=noise_gen) for n in others[batch_before:]]
        rows = len(drafts)
        meta = make_meta([1.0] * rows, top_p=[0.95] * rows, generators={batch_before: gen})
        out = RejectionSampler()(torch.cat(parts), spec, meta)
        outputs.append([t for t in out.output_token_ids[batch_before].tolist() if t >= 0])
    return outputs


def test_seeded_row_reproduces_across_batch_mixes() -> None:
    alone = seeded_steps(42, 0, 0)
    assert seeded_steps(42, 3, 2) == alone
    assert seeded_steps(42, 1, 5) == alone
    assert seeded_steps(43, 0, 0) != alone


def test_row_without_drafts_samples_like_the_sampler() -> None:
    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(9))
    meta_args = dict(temperature=[0.8, 0.0, 1.2, 0.8, 1.0], top_p=[0.9, 1.0, 1.0, 0.9, 0.5])
    gens_a = {0: torch.Generator().manual_seed(11), 3: torch.Generator().manual_seed(12)}
    gens_b = {0: torch.Generator().manual_seed(11), 3: torch.Generator().manual_seed(12)}
    spec = SpecDecodeMetadata.build([[]] * 5, CPU)
    for _ in range(4):  # several steps: both consume the generators identically
        plain = Sampler()(logits.clone(), make_meta(generators=gens_a, **meta_args))  # type: ignore[arg-type]
        spec_out = RejectionSampler()(logits.clone(), spec, make_meta(generators=gens_b, **meta_args))  # type: ignore[arg-type]
        assert spec_out.num_accepted.tolist() == [0] * 5
        for row in (0, 1, 3):  # seeded and greedy rows are deterministic
            assert spec_out.output_token_ids[row, 0] == plain.sampled_token_ids[row]


def test_mixed_batch_keeps_greedy_rows_exact() -> None:
    logits, spec, expected, matches = greedy_chain_case(2)
    temps = [0.0 if row % 2 == 0 else 1.0 for row in range(spec.num_rows)]
    out = RejectionSampler()(logits, spec, make_meta(temps, generators={1: torch.Generator().manual_seed(1)}))
    for row in range(0, spec.num_rows, 2):
        assert out.num_accepted[row] == matches[row]
        assert out.output_token_ids[row, :len(expected[row])].tolist() == expected[row]
    emitted = (out.output_token_ids >= 0).sum(-1)
    assert (emitted == out.num_accepted + 1).all()
    assert np.all(out.num_accepted.numpy() <= np.array(spec.num_draft_tokens))


def test_grammar_mask_applies_per_position() -> None:
    vocab, k = 20, 3
    logits = torch.randn(k + 1, vocab, generator=torch.Generator().manual_seed(10))
    allowed = torch.ones(k + 1, vocab, dtype=torch.bool)
    allowed[1, logits[1].argmax()] = False  # the grammar forbids position 1's favourite
    allowed[2, :vocab // 2] = False
    # One 32-bit word per position (vocab <= 32): bit t set = token t allowed.
    bits = (allowed.to(torch.int64) << torch.arange(vocab)).sum(-1, keepdim=True).to(torch.int32)
    chain = [int(t) for t in logits.masked_fill(~allowed, float("-inf")).argmax(-1)]
    reference = sequential_greedy(logits, lambda generated: make_meta([0.0], token_bitmask=bits[len(generated):
                                                                                               len(generated) + 1]))
    assert reference == chain and chain[1] != int(logits[1].argmax())
    sampler = RejectionSampler()
    spec = SpecDecodeMetadata.build([chain[:k]], CPU)
    out = sampler(logits.clone(), spec, make_meta([0.0]), token_bitmask=bits)  # masks are applied in place
    assert out.num_accepted.tolist() == [k] and out.output_token_ids[0].tolist() == chain
    unmasked = [int(t) for t in logits.argmax(-1)][:k]
    out = sampler(logits.clone(), SpecDecodeMetadata.build([unmasked], CPU), make_meta([0.0]), token_bitmask=bits)
    assert out.num_accepted.tolist() == [1] and out.output_token_ids[0, :2].tolist() == chain[:2]
    with pytest.raises(ValueError, match="bitmask per scored position"):
        sampler(logits, spec, make_meta([0.0], token_bitmask=bits[:1]))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_synthetic_acceptance_ignores_draft_values(temperature: float) -> None:
    rows, k, rate = 4000, 4, 0.7
    logits = torch.randn(rows * (k + 1), 50, generator=torch.Generator().manual_seed(12))
    spec = SpecDecodeMetadata.build([[49] * k] * rows, CPU)  # drafts the target would almost never pick
    torch.manual_seed(13)
    out = RejectionSampler(synthetic_acceptance=rate)(logits, spec, make_meta([temperature] * rows))
    # Accepted length ~ truncated geometric: P(a >= j) = rate ** j.
    for j in range(1, k + 1):
        observed = float((out.num_accepted >= j).double().mean())
        assert abs(observed - rate ** j) < 5 * (rate ** j * (1 - rate ** j) / rows) ** 0.5 + 1e-3, j
    if temperature == 0.0:  # the stop position emits the target's own argmax
        stop = spec.first_logits_indices + out.num_accepted
        assert (out.output_token_ids.gather(1, out.num_accepted[:, None])[:, 0] == logits[stop].argmax(-1)).all()
    with pytest.raises(ValueError, match="spec_synthetic_acceptance"):
        RejectionSampler(synthetic_acceptance=1.5)
