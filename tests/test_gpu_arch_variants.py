"""The config variants of test_arch_variants.py / test_rope_scaling.py on the GPU fast path (Triton
kernels, CUDA graphs): biases on every projection (the GEMV and GEMM paths add them), YaRN's
scaled cos/sin in the fused rotary + KV-write kernel, and the head shapes of real families the tiny models
lack (Qwen2.5's 7 query heads per KV head, MQA, head_dim 80 / 96 / 256), against transformers on the same
device."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch

from agentserve import SamplingParams
from agentserve.llm import LLM
from helpers.logprobs_close import assert_close_greedy, greedy_result, hf_greedy
from helpers.model_variants import biased_model, reshaped_model, with_config

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PROMPTS = ["The quick brown fox", "Once upon a time there lived a king who had three daughters, and the youngest "
           "of them was so beautiful that the sun itself, which has seen so much, was astonished"]
NEW_TOKENS = 24


# Built on demand: one model directory per test.
VARIANTS: dict[str, Callable[[Path], Path]] = {
    "llama-biases": lambda tmp: biased_model(tmp, "llama", attention_bias=True, mlp_bias=True),
    "qwen3-biases": lambda tmp: biased_model(tmp, "qwen3", attention_bias=True),
    "qwen2-yarn": lambda tmp: with_config(tmp, "qwen2", "qwen2-yarn", max_position_embeddings=256, rope_scaling={
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}),
    "qwen2-7-per-kv": lambda tmp: reshaped_model(tmp, "qwen2", "qwen2-7-per-kv", hidden_size=224, num_attention_heads=14,
                                                 num_key_value_heads=2, head_dim=16),
    "qwen3-mqa-hd80": lambda tmp: reshaped_model(tmp, "qwen3", "qwen3-mqa-hd80", num_attention_heads=6,
                                                 num_key_value_heads=1, head_dim=80),
    "llama-hd96-3-per-kv": lambda tmp: reshaped_model(tmp, "llama3", "llama-hd96", hidden_size=96, num_attention_heads=6,
                                                      num_key_value_heads=2, head_dim=96),
    "mistral-hd256": lambda tmp: reshaped_model(tmp, "mistral", "mistral-hd256", num_attention_heads=4,
                                                num_key_value_heads=4, head_dim=256, sliding_window=None),
}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_matches_transformers_on_gpu(tmp_path: Path, variant: str, dtype: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = VARIANTS[variant](tmp_path)
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
