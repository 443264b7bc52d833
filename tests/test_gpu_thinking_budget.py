"""thinking_token_budget on CUDA (decode graphs, the device bitmask), plain and with ngram speculation: the
reasoning ends at the budget, and greedy outputs equal the CPU engine's and each other."""

from __future__ import annotations

import pytest
import torch

from agentserve import SamplingParams
from agentserve.llm import LLM
from agentserve.testing import tiny_model_cached

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PROMPTS = ["Think it over: a b a b a b", "Why is the sky blue?"]
ENGINE = dict(dtype="float32", max_model_len=256, num_blocks=128, reasoning_parser="qwen3")
BUDGET = 5


def _outputs(device: str, **extra: object) -> list[list[int]]:
    llm = LLM(str(tiny_model_cached("qwen3")), device=device, **ENGINE, **extra)
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, thinking_token_budget=BUDGET)
    got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]
    assert llm.engine.reasoning is not None
    end = llm.engine.reasoning.end_id
    llm.close()
    assert all(ids[BUDGET] == end for ids in got), (device, got)
    return got


def test_budget_on_cuda_matches_cpu_and_speculation() -> None:
    cuda = _outputs("cuda")
    assert cuda == _outputs("cpu")
    assert cuda == _outputs("cuda", speculative_method="ngram", prompt_lookup_min=1, num_speculative_tokens=3,
                            spec_dynamic=False)
