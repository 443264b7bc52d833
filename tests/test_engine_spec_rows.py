"""Rows of several sampled positions end to end on the tiny architectures: speculative tokens are
injected through Engine.spec_proposer (the target's own greedy continuation, then tokens it would
not generate) and the outputs must equal those of plain decoding, in fewer steps when the guesses
are right, under chunked prefill, prefix caching, preemption and async scheduling on and off."""

from __future__ import annotations

import functools
from typing import Optional

import pytest

from agentserve import SamplingParams
from agentserve.llm import LLM
from agentserve.request import Request
from agentserve.testing import tiny_model_cached

NEW_TOKENS = 24
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=2)
# A shared 24-token prefix (prefix-cache hits across prompts) and prompts long enough to be chunked.
SHARED = [(13 * i) % 200 + 5 for i in range(24)]
PROMPTS = [SHARED + [(7 * i + j) % 150 + 3 for j in range(4 + 9 * i)] for i in range(4)]
SETTINGS = {
    "chunked": dict(max_num_batched_tokens=16),
    "prefix_cache": dict(enable_prefix_caching=True),
    # 24 pages of 4 tokens for 4 sequences of 52 to 79 tokens, no output reserve at admission:
    # decoding runs the pool dry and preemption by recompute happens.
    "preemption": dict(num_blocks=24, block_size=4, max_num_batched_tokens=32, decode_reserve_tokens=0),
}


def run(arch: str, setting: str, async_scheduling: bool, reference: Optional[dict[str, list[int]]] = None,
        num_correct: int = 0, num_wrong: int = 0) -> tuple[dict[str, list[int]], int, int]:
    """(output tokens per request id, engine steps, preemptions); with `reference`, every decode
    verifies `num_correct` of its reference tokens followed by `num_wrong` wrong ones."""
    llm = LLM(str(tiny_model_cached(arch)), device="cpu", dtype="float32", async_scheduling=async_scheduling,
              **SETTINGS[setting])
    engine = llm.engine
    vocab = engine.arch.vocab_size

    class Propose:
        """Engine.spec_proposer: `num_correct + num_wrong` tokens every step."""

        def num_tokens_for_step(self, batch_size: int) -> int:
            return num_correct + num_wrong

        def __call__(self, requests: list[Request], num_tokens: int) -> None:
            propose(requests)

        def after_launch(self, step: object) -> None:
            pass  # its proposals are made on the host, from the reference

        def release(self) -> None:
            pass

    def propose(requests: list[Request]) -> None:
        assert reference is not None
        for req in requests:
            ref = reference[req.request_id]
            n = req.num_output_tokens
            spec = ref[n:n + num_correct]
            spec += [(t + 1) % vocab for t in ref[n + len(spec):n + len(spec) + num_wrong]]
            req.spec_token_ids = spec

    if reference is not None:
        engine.spec_proposer = Propose()
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"r{i}", prompt, GREEDY)
    outputs: dict[str, list[int]] = {}
    steps = 0
    while engine.has_unfinished():
        for out in engine.step():
            completion = out.outputs[0]
            assert completion.logprobs is not None and len(completion.logprobs) == len(completion.token_ids)
            outputs[out.request_id] = completion.token_ids
        steps += 1
    preemptions = engine.metrics.num_preemptions_total
    engine.pool.check_all_free()
    llm.close()
    return outputs, steps, preemptions


@functools.lru_cache(maxsize=None)
def plain(arch: str, setting: str, async_scheduling: bool) -> tuple[dict[str, list[int]], int, int]:
    return run(arch, setting, async_scheduling)


@pytest.mark.parametrize("async_scheduling", [False, True])
@pytest.mark.parametrize("arch, setting", [("llama", s) for s in SETTINGS] + [("qwen3", "preemption")])
def test_injected_spec_tokens_keep_outputs_identical(arch: str, setting: str, async_scheduling: bool) -> None:
    reference, plain_steps, plain_preemptions = plain(arch, setting, async_scheduling)
    assert all(len(tokens) == NEW_TOKENS for tokens in reference.values())
    if setting == "preemption":
        assert plain_preemptions > 0
    all_right, right_steps, _ = run(arch, setting, async_scheduling, reference, num_correct=3)
    assert all_right == reference
    assert right_steps < plain_steps
    # One right guess then two wrong ones: each row accepts one, rejects two, and the target's own
    # token replaces the first rejected one.
    mixed, _, _ = run(arch, setting, async_scheduling, reference, num_correct=1, num_wrong=2)
    assert mixed == reference
