"""A seeded random request under dynamic speculation (spec_dynamic, the default) gets the same tokens
whatever else the engine serves: k is chosen per step from the batch size and the acceptance measured
over all traffic, and a seeded row's random draws follow its drafts (k uniforms, then the noise), so
a row that speculated would sample other tokens from the same seed when the traffic changed. It used
to: the same seeded request sent twice to one engine came back different after a busy batch."""

from __future__ import annotations

from agentserve import SamplingParams
from agentserve.llm import LLM
from agentserve.testing import tiny_model_cached

ARCH = "qwen2"
ENGINE = dict(device="cpu", dtype="float32", max_num_seqs=64, num_blocks=1024)
PROMPT = [5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7]
SEEDED = SamplingParams(temperature=1.0, top_k=3, max_tokens=24, ignore_eos=True, seed=42)


def test_a_seeded_request_does_not_depend_on_the_traffic_under_dynamic_speculation() -> None:
    path = str(tiny_model_cached(ARCH))
    with LLM(path, **ENGINE) as plain:
        want = plain.generate([PROMPT], SEEDED)[0].outputs[0].token_ids
    with LLM(path, speculative_method="ngram", prompt_lookup_min=1, num_speculative_tokens=4, **ENGINE) as llm:
        assert llm.engine.config.spec.spec_dynamic
        alone = llm.generate([PROMPT], SEEDED)[0].outputs[0].token_ids
        others = [[i, i + 1, i + 2, i, i + 1, i + 2] for i in range(10, 50)]
        busy = llm.generate([PROMPT, *others], [SEEDED] + [SamplingParams(temperature=0.0, max_tokens=24)] * 40)
        again = llm.generate([PROMPT], SEEDED)[0].outputs[0].token_ids
        assert llm.engine.metrics.spec_num_draft_tokens > 0  # the unseeded rows did speculate
    assert busy[0].outputs[0].token_ids == alone
    assert again == alone
    assert alone == want  # drawn as without speculation
