"""The config variants of test_arch_variants.py / test_rope_scaling.py on the GPU fast path (Triton
kernels, CUDA graphs): biases on every projection (the GEMV and GEMM paths add them) and YaRN's
scaled cos/sin in the fused rotary + KV-write kernel, against transformers on the same device."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from agentserve import SamplingParams
from agentserve.llm import LLM
from helpers.logprobs_close import assert_close_greedy, greedy_result, hf_greedy
from helpers.model_variants import biased_model, with_config

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PROMPTS = ["The quick brown fox", "Once upon a time there lived a king who had three daughters, and the youngest "
           "of them was so beautiful that the sun itself, which has seen so much, was astonished"]
NEW_TOKENS = 24


def _variants(tmp_path: Path) -> dict[str, Path]:
    return {
        "llama-biases": biased_model(tmp_path, "llama", attention_bias=True, mlp_bias=True),
        "qwen3-biases": biased_model(tmp_path, "qwen3", attention_bias=True),
        "qwen2-yarn": with_config(tmp_path, "qwen2", "qwen2-yarn", max_position_embeddings=256,
                                  rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}),
    }


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("variant", ["llama-biases", "qwen3-biases", "qwen2-yarn"])
def test_variant_matches_transformers_on_gpu(tmp_path: Path, variant: str, dtype: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _variants(tmp_path)[variant]
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).cuda().eval()
    ref = tuple(map(list, zip(*[hf_greedy(model, p, NEW_TOKENS) for p in prompts])))
    del model
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, logprobs=5, ignore_eos=True)
    # max_num_seqs 1: the second prompt decodes alone, through the batch-1 GEMV and a CUDA graph.
    with LLM(str(path), dtype=dtype, num_blocks=64, max_num_seqs=1) as llm:
        assert llm.engine.runner.graphs is not None
        got = greedy_result(llm.generate(prompts, params))
    torch.cuda.empty_cache()
    if dtype == "float32":
        assert got[0] == ref[0], f"{variant}: tokens differ from transformers"
    assert_close_greedy((ref[0], ref[1]), got, f"{variant} {dtype}")
