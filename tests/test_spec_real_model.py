"""Speculation on the real SmolLM2-135M-Instruct: greedy outputs identical to no speculation with a
draft made by truncating it to its first layers, and with n-gram lookup on an agent-like prompt (a
tool result repeated back), where n-gram proposals are accepted. Marked `real_model`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agentserve import SamplingParams
from agentserve.llm import LLM
from agentserve.testing.drafts import first_layers_copy
from agentserve.testing.real import RealModelUnavailable, cache_root, smollm2_cached

pytestmark = pytest.mark.real_model

RECORD = {"id": "ord-20931", "customer": "Ada Lovelace", "status": "shipped", "carrier": "DHL",
          "tracking": "JD014600003828"}
CONVERSATIONS = [
    [{"role": "user", "content": f"Tool result: {json.dumps(RECORD)}\nRepeat the record exactly, as JSON."}],
    [{"role": "user", "content": "What is the capital of France? Answer in two sentences."}],
]


@pytest.fixture(scope="module")
def model_dir() -> Path:
    try:
        return smollm2_cached()
    except RealModelUnavailable as e:
        pytest.skip(str(e))


def generate(model: Path, **spec: Any) -> tuple[list[list[int]], LLM]:
    llm = LLM(str(model), device="cpu", dtype="float32", spec_dynamic=False, **spec)
    prompts = [llm.render_chat(c) for c in CONVERSATIONS]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=48))
    return [o.outputs[0].token_ids for o in outs], llm


def test_truncated_draft_and_ngram_keep_greedy_outputs(model_dir: Path) -> None:
    plain, _ = generate(model_dir)
    draft = first_layers_copy(model_dir, 24, cache_root())
    with_draft, llm = generate(model_dir, draft_model=str(draft))
    assert with_draft == plain
    m = llm.engine.metrics
    assert m.spec_num_draft_tokens > 0 and m.spec_num_accepted_tokens > 0
    with_ngram, llm = generate(model_dir, speculative_method="ngram")
    assert with_ngram == plain
    assert llm.engine.metrics.spec_num_accepted_tokens > 0  # the record is copied: lookups hit
