"""Speculative decoding with LoRA: the target applies each request's adapter, the draft (a draft
model, or n-gram lookup) runs as the base model; greedy outputs stay identical to PEFT's merged
model, in a batch mixing adapters and base requests, with one slot for two adapters."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import pytest
import torch

from agentserve import SamplingParams
from agentserve.llm import LLM
from agentserve.testing import tiny_model_cached
from helpers.lora import ALL_MODULES, build_peft_adapter, peft_greedy
from helpers.spec_models import small_draft

NEW_TOKENS = 12
SHARED = [5, 6, 7, 8, 9, 10, 5, 6, 7, 8, 9, 10, 5, 6, 7, 8]  # repetitive: n-gram lookup finds matches
PROMPTS = [SHARED + [(3 * i + j) % 7 + 11 for j in range(6 + 5 * i)] for i in range(3)]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tiny_model_cached("qwen2")
    root = tmp_path_factory.mktemp("peft")
    return {"a": build_peft_adapter(base, root / "a", seed=21, r=8, lora_alpha=16, target_modules=list(ALL_MODULES)),
            "b": build_peft_adapter(base, root / "b", seed=22, r=16, lora_alpha=16, target_modules=["q_proj", "v_proj"])}


def assert_mixed_batch_matches_peft(llm: LLM, base: Path, adapters: dict[str, Path], kind: str) -> None:
    """Every prompt under adapter a, the base model and adapter b in one batch: greedy tokens equal to
    PEFT's merged model of the same adapter."""
    names: list[Optional[str]] = ["a", None, "b"]
    prompts = [p for p in PROMPTS for _ in names]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True),
                        adapter=names * len(PROMPTS))
    for i, out in enumerate(outs):
        name = names[i % len(names)]
        ref = peft_greedy(base, adapters[name] if name else None, [prompts[i]], NEW_TOKENS)[0]
        assert list(out.outputs[0].token_ids) == ref, (kind, name, i)


@pytest.mark.parametrize("kind", ["ngram", "self", "small"])
@pytest.mark.parametrize("async_scheduling", [False, True])
def test_speculation_with_adapters_is_exact(kind: str, async_scheduling: bool, adapters: dict[str, Path]) -> None:
    base = tiny_model_cached("qwen2")
    spec: dict[str, Any] = (dict(speculative_method="ngram", prompt_lookup_min=1) if kind == "ngram" else
                            dict(draft_model=str(base) if kind == "self" else small_draft("qwen2")))
    llm = LLM(str(base), device="cpu", dtype="float32", max_num_batched_tokens=32, num_blocks=256,
              async_scheduling=async_scheduling, spec_dynamic=False, enable_lora=True, max_loras=1,
              lora_modules={n: str(p) for n, p in adapters.items()}, **spec)
    assert_mixed_batch_matches_peft(llm, base, adapters, kind)
    assert llm.engine.metrics.spec_num_draft_tokens > 0  # speculation did run
    llm.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["ngram", "self"])
def test_speculation_with_adapters_on_gpu_graphs(kind: str, adapters: dict[str, Path]) -> None:
    """CUDA: decode and verification CUDA graphs captured; steps with adapter rows must apply them
    (verification of adapter rows runs eager, decode replays the LoRA decode graphs)."""
    base = tiny_model_cached("qwen2")
    spec: dict[str, Any] = (dict(speculative_method="ngram", prompt_lookup_min=1) if kind == "ngram" else
                            dict(draft_model=str(base)))
    llm = LLM(str(base), device="cuda", dtype="float32", max_num_seqs=16, max_model_len=512,
              gpu_memory_utilization=0.3, spec_dynamic=False, enable_lora=True, max_loras=1,
              lora_modules={n: str(p) for n, p in adapters.items()}, **spec)
    assert_mixed_batch_matches_peft(llm, base, adapters, kind)
    llm.close()
