"""LoRA adapters stay in the model dtype over FP8 base weights: on the CPU (dequantize-then-matmul)
an adapter over the FP8 model gives exactly what it gives over a 16-bit checkpoint holding the
dequantized base weights, and it changes the greedy tokens (so the comparison proves something)."""

from __future__ import annotations

from pathlib import Path

import torch

from agentserve import SamplingParams
from agentserve.kernels.fp8_utils import FP8_DTYPE
from agentserve.llm import LLM
from agentserve.testing import tiny_model_cached
from helpers.fp8_checkpoints import channel_quantizer, write_checkpoints
from helpers.lora import ALL_MODULES, build_peft_adapter

TEXTS = ["The quick brown fox", "In a distant galaxy, a small robot named"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def _generate(base: Path, adapter: Path, **kw: object) -> tuple[list[list[int]], list[list[int]], LLM]:
    llm = LLM(str(base), device="cpu", dtype="float32", max_model_len=256, num_blocks=128, enable_lora=True,
              max_lora_rank=16, lora_modules={"a": str(adapter)}, **kw)
    prompts = [llm.tokenizer.encode(t) for t in TEXTS]
    with_adapter = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, adapter=["a"] * len(prompts))]
    base_only = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
    return with_adapter, base_only, llm


def test_lora_over_fp8_base_equals_lora_over_dequantized_base(tmp_path: Path) -> None:
    src = tiny_model_cached("llama")
    _, deq = write_checkpoints(src, tmp_path / "ckpt", channel_quantizer(torch.float32), None)
    adapter = build_peft_adapter(src, tmp_path / "adapter", seed=3, r=8, lora_alpha=16,
                                 target_modules=list(ALL_MODULES), scale=4.0)
    fp8_tokens, fp8_base, fp8_llm = _generate(src, adapter, quantization="fp8")
    base_proj = fp8_llm.engine.runner.model.layers[0].self_attn.qkv_proj
    assert base_proj.base_layer.weight.dtype == FP8_DTYPE  # wrapped by LoRA, still FP8 underneath
    fp8_llm.close()
    deq_tokens, deq_base, deq_llm = _generate(deq, adapter)
    deq_llm.close()
    assert fp8_tokens == deq_tokens and fp8_base == deq_base
    assert fp8_tokens != fp8_base
