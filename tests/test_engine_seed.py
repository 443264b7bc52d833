"""vLLM's --seed / LLM(seed=...): requests without a seed of their own sample reproducibly across engine
restarts (the same requests in the same order give the same tokens), a different seed gives other tokens,
and a request's own seed keeps giving its tokens whatever the engine's seed."""

from __future__ import annotations

from typing import Any

import torch

from agentserve import LLM, SamplingParams
from agentserve.testing import tiny_model_cached

PROMPTS = ["Once upon a time", "The capital of", "1 2 3"]
ENGINE: dict[str, Any] = dict(device="cpu", dtype="float32", num_blocks=64, max_model_len=128)
UNSEEDED = SamplingParams(temperature=1.0, max_tokens=12)


def _two_rounds(params: SamplingParams, torch_seed: int, **engine: Any) -> list[list[int]]:
    """A fresh engine's tokens for PROMPTS, generated twice. `torch_seed` seeds torch's default generator
    first: the engine's draws must not depend on it (other code in the process uses it)."""
    with LLM(str(tiny_model_cached("qwen2")), **ENGINE, **engine) as llm:
        torch.manual_seed(torch_seed)
        return [o.outputs[0].token_ids for _ in range(2) for o in llm.generate(PROMPTS, params)]


def test_engine_seed_makes_unseeded_sampling_reproducible() -> None:
    seeded_7 = _two_rounds(UNSEEDED, 1, seed=7)
    assert seeded_7[:3] != seeded_7[3:]  # within one engine the stream moves on
    assert _two_rounds(UNSEEDED, 2, seed=7) == seeded_7
    assert _two_rounds(UNSEEDED, 1, seed=8) != seeded_7
    assert _two_rounds(UNSEEDED, 3) == _two_rounds(UNSEEDED, 4, seed=0)  # vLLM V1's default seed is 0


def test_request_seed_ignores_the_engine_seed() -> None:
    params = SamplingParams(temperature=1.0, max_tokens=12, seed=42)
    assert _two_rounds(params, 1, seed=7) == _two_rounds(params, 1, seed=8)


def test_engine_seed_covers_speculative_verification() -> None:
    """Unseeded rows' acceptance uniforms and recovery noise (the rejection sampler) come from the seed too."""
    spec: dict[str, Any] = dict(speculative_method="ngram", num_speculative_tokens=2, prompt_lookup_min=1)
    assert _two_rounds(UNSEEDED, 1, seed=3, **spec) == _two_rounds(UNSEEDED, 2, seed=3, **spec)
