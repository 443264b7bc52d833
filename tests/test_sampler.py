"""The sampler draws from the right distribution; seeds reproduce across batch mixes; n > 1."""

from __future__ import annotations

import math

import pytest
import torch

from agentserve import SamplingParams
from agentserve.llm import LLM
from agentserve.sampling.sampler import Sampler, SamplingMetadata
from agentserve.testing import tiny_model_cached

LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])


def sample_many(rows: int, rounds: int, temperature: float, top_k: int = 0, top_p: float = 1.0,
                min_p: float = 0.0) -> torch.Tensor:
    sampler = Sampler()
    counts = torch.zeros(len(LOGITS))
    torch.manual_seed(1234)
    for _ in range(rounds):
        meta = SamplingMetadata(
            temperature=torch.full((rows,), temperature), all_greedy=False,
            top_k=torch.full((rows,), top_k, dtype=torch.long) if top_k else None,
            top_p=torch.full((rows,), top_p) if top_p < 1.0 else None,
            min_p=torch.full((rows,), min_p) if min_p > 0 else None, generators={})
        out = sampler(LOGITS.expand(rows, -1).clone(), meta)
        counts += torch.bincount(out.sampled_token_ids, minlength=len(LOGITS)).float()
    return counts / counts.sum()


def expected(temperature: float, keep: list[int]) -> torch.Tensor:
    probs = torch.zeros(len(LOGITS))
    p = (LOGITS[keep] / temperature).softmax(-1)
    probs[keep] = p
    return probs


def assert_matches(observed: torch.Tensor, target: torch.Tensor, n: int) -> None:
    # Each frequency within 5 standard errors of its target; zero-probability tokens never drawn.
    for i, (o, t) in enumerate(zip(observed.tolist(), target.tolist())):
        if t == 0.0:
            assert o == 0.0, f"token {i} has probability 0 but was drawn ({o:.4f})"
        else:
            se = math.sqrt(t * (1 - t) / n)
            assert abs(o - t) < 5 * se + 1e-4, f"token {i}: observed {o:.4f}, expected {t:.4f}"


N_ROWS, N_ROUNDS = 2000, 10


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_distribution(temperature: float) -> None:
    observed = sample_many(N_ROWS, N_ROUNDS, temperature)
    assert_matches(observed, expected(temperature, list(range(8))), N_ROWS * N_ROUNDS)


def test_top_k_distribution() -> None:
    observed = sample_many(N_ROWS, N_ROUNDS, 1.0, top_k=3)
    assert_matches(observed, expected(1.0, [0, 1, 2]), N_ROWS * N_ROUNDS)


def test_top_p_distribution() -> None:
    full = LOGITS.softmax(-1)
    # The nucleus is the smallest set of top tokens whose mass reaches top_p.
    top_p = float(full[:3].sum()) - 0.01
    observed = sample_many(N_ROWS, N_ROUNDS, 1.0, top_p=top_p)
    assert_matches(observed, expected(1.0, [0, 1, 2]), N_ROWS * N_ROUNDS)


def test_min_p_distribution() -> None:
    full = LOGITS.softmax(-1)
    min_p = float(full[3] / full[0]) - 1e-4  # tokens 0..3 survive
    observed = sample_many(N_ROWS, N_ROUNDS, 1.0, min_p=min_p)
    assert_matches(observed, expected(1.0, [0, 1, 2, 3]), N_ROWS * N_ROUNDS)


def test_greedy_is_argmax() -> None:
    meta = SamplingMetadata(temperature=torch.zeros(3), all_greedy=True, top_k=None, top_p=None, min_p=None,
                            generators={})
    logits = torch.randn(3, 50)
    out = Sampler()(logits, meta)
    assert out.sampled_token_ids.tolist() == logits.argmax(-1).tolist()


def test_noise_drawn_ahead_gives_the_same_tokens() -> None:
    """model_runner.launch draws the noise before the grammar masks: the same generators (device
    generator for the batch, own generators for seeded rows) give the same tokens either way."""
    from agentserve.sampling.sampler import draw_noise

    logits = torch.randn(6, 300)
    temps = torch.tensor([0.7, 1.0, 0.0, 1.3, 0.9, 1.0])

    def meta() -> SamplingMetadata:
        gens = {1: torch.Generator().manual_seed(5), 4: torch.Generator().manual_seed(9)}
        return SamplingMetadata(temperature=temps, all_greedy=False, top_k=None, top_p=None, min_p=None,
                                generators=gens)

    torch.manual_seed(3)
    inline = Sampler()(logits.clone(), meta()).sampled_token_ids
    torch.manual_seed(3)
    m = meta()
    noise = draw_noise(6, 300, m.generators, logits.device)
    ahead = Sampler()(logits.clone(), m, noise).sampled_token_ids
    assert ahead.tolist() == inline.tolist()
    torch.manual_seed(4)  # other device draws: the unseeded rows may change, the seeded ones may not
    other = Sampler()(logits.clone(), meta()).sampled_token_ids
    assert other[1] == inline[1] and other[4] == inline[4] and other[2] == logits[2].argmax()


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(str(tiny_model_cached("llama3")), device="cpu", dtype="float32")


def test_seed_reproducible_across_batch_mixes(llm: LLM) -> None:
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=42, max_tokens=24, ignore_eos=True)
    alone = llm.generate(["Hello there"], seeded)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=1.0, max_tokens=n, ignore_eos=True) for n in (5, 30, 12)]
    mixed = llm.generate(["A", "Hello there", "The quick brown fox jumps", "zz"],
                         [others[0], seeded, others[1], others[2]])
    assert mixed[1].outputs[0].token_ids == alone
    other_seed = llm.generate(["Hello there"], seeded.clone(seed=43))[0].outputs[0].token_ids
    assert other_seed != alone


def test_n_greater_than_one_forks_prompt_pages(llm: LLM) -> None:
    prompt = "Once upon a time in a land far away there was a"
    params = SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=16, ignore_eos=True)
    out = llm.generate([prompt], params)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    seqs = [tuple(c.token_ids) for c in out.outputs]
    assert all(len(s) == 16 for s in seqs)
    assert len(set(seqs)) > 1, "independent samples should differ"
    # The prompt was prefilled once: siblings recompute only its last token.
    assert out.metrics is not None
    again = llm.generate([prompt], params)[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]
    greedy = llm.generate([prompt], SamplingParams(n=3, temperature=0.0, max_tokens=8))[0]
    assert len({tuple(c.token_ids) for c in greedy.outputs}) == 1


def test_n_greater_than_one_prefills_prompt_once(llm: LLM) -> None:
    engine = llm.engine
    before = engine.metrics.prefilled_tokens_total
    prompt_ids = engine.encode("A fresh prompt that nobody has seen before, long enough to span pages")
    llm.generate([prompt_ids], SamplingParams(n=3, temperature=1.0, max_tokens=4, seed=1))
    prefilled = engine.metrics.prefilled_tokens_total - before
    assert prefilled == len(prompt_ids) + 2  # once, plus the last prompt token for each sibling


def test_penalties_change_outputs(llm: LLM) -> None:
    base = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    plain = llm.generate(["the the the"], base)[0].outputs[0].token_ids
    rep = llm.generate(["the the the"], base.clone(repetition_penalty=2.0))[0].outputs[0].token_ids
    freq = llm.generate(["the the the"], base.clone(frequency_penalty=2.0, presence_penalty=1.0))[0].outputs[0].token_ids
    assert rep != plain and freq != plain
    # A strong frequency penalty makes repeats rarer than greedy decoding's.
    assert len(set(freq)) >= len(set(plain))


def test_min_tokens_blocks_eos(llm: LLM) -> None:
    eos = next(iter(llm.engine.eos_token_ids))
    params = SamplingParams(temperature=0.0, max_tokens=10, min_tokens=10, stop_token_ids=[eos])
    out = llm.generate(["Hi"], params)[0].outputs[0]
    assert len(out.token_ids) == 10 and eos not in out.token_ids


def test_min_p_comes_before_top_p_as_in_vllm_v1() -> None:
    """vLLM V1 applies min_p (an argmax-invariant logits processor) before top-k / top-p, so the nucleus is
    taken over the min-p-filtered distribution: here {0, 1}, where top-p first (transformers' order) keeps {0, 1, 2}."""
    from agentserve.sampling.sampler import top_k_top_p_min_p

    logits = torch.tensor([[0.45, 0.25, 0.12, 0.10, 0.05, 0.03]]).log()
    kept = top_k_top_p_min_p(logits, None, torch.tensor([0.75]), torch.tensor([0.2])).isfinite()[0]
    assert kept.nonzero().flatten().tolist() == [0, 1]
    kept = top_k_top_p_min_p(logits, torch.tensor([3]), None, torch.tensor([0.2])).isfinite()[0]
    assert kept.nonzero().flatten().tolist() == [0, 1, 2]  # top-k and min-p commute
