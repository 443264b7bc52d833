"""config.json variants of the served families that change the math: Llama with attention_bias (q/k/v
and o_proj biases) and mlp_bias, Qwen3 with attention_bias; served exactly as transformers runs them
(greedy tokens identical, logprobs close), also with LoRA on the biased projections and under tensor
parallelism. An activation other than silu is a start-up error naming it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from agentserve import SamplingParams
from agentserve.llm import LLM
from agentserve.model.arch_config import ArchConfig, ModelLoadError
from helpers.logprobs_close import assert_close_greedy, greedy_result, hf_greedy
from helpers.lora import ALL_MODULES, build_peft_adapter, peft_greedy
from helpers.model_variants import biased_model

PROMPTS = ["The quick brown fox", "def fibonacci(n):\n    if n < 2:\n        return n\n    return"]
NEW_TOKENS = 16


@pytest.mark.parametrize("arch,flags,biased", [
    ("llama", {"attention_bias": True, "mlp_bias": True}, ("q", "o", "mlp")),
    ("llama", {"attention_bias": False, "mlp_bias": True}, ("mlp",)),
    ("qwen3", {"attention_bias": True}, ("q", "o")),
])
def test_biased_variants_match_transformers(tmp_path: Path, arch: str, flags: dict[str, bool],
                                            biased: tuple[str, ...]) -> None:
    path = biased_model(tmp_path, arch, **flags)
    shape = ArchConfig.from_dir(path)
    assert (shape.attention_bias, shape.o_proj_bias, shape.mlp_bias) == ("q" in biased, "o" in biased, "mlp" in biased)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    ref = tuple(zip(*[hf_greedy(model, p, NEW_TOKENS) for p in prompts]))
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, logprobs=5, ignore_eos=True)
    with LLM(str(path), device="cpu", dtype="float32", max_num_batched_tokens=8) as llm:
        got = greedy_result(llm.generate(prompts, params))
    assert got[0] == [list(ids) for ids in ref[0]], f"{arch} {flags}: tokens differ from transformers"
    assert_close_greedy((list(ref[0]), list(ref[1])), got, f"{arch} {flags}")


def test_qwen2_and_mistral_follow_their_fixed_biases() -> None:
    """transformers gives Qwen2 q/k/v biases and Mistral none whatever attention_bias says."""
    base = {"hidden_size": 64, "num_attention_heads": 4, "vocab_size": 128, "intermediate_size": 128,
            "num_hidden_layers": 2}
    qwen2 = ArchConfig.from_dict(dict(base, architectures=["Qwen2ForCausalLM"], attention_bias=False))
    mistral = ArchConfig.from_dict(dict(base, architectures=["MistralForCausalLM"], attention_bias=True, mlp_bias=True))
    assert (qwen2.attention_bias, qwen2.o_proj_bias, qwen2.mlp_bias) == (True, False, False)
    assert (mistral.attention_bias, mistral.o_proj_bias, mistral.mlp_bias) == (False, False, False)


def test_unsupported_activation_is_named() -> None:
    with pytest.raises(ModelLoadError, match="hidden_act 'gelu' is not supported"):
        ArchConfig.from_dict({"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
                              "vocab_size": 128, "intermediate_size": 128, "num_hidden_layers": 2,
                              "hidden_act": "gelu"})


def test_lora_over_biased_projections_matches_peft(tmp_path: Path) -> None:
    """LoRA on every projection of a Llama whose projections all carry biases: PEFT merged is the reference."""
    path = biased_model(tmp_path, "llama", attention_bias=True, mlp_bias=True)
    adapter = build_peft_adapter(path, tmp_path / "adapter", seed=3, scale=4.0, r=8, lora_alpha=16,
                                 target_modules=list(ALL_MODULES))
    prompts = [AutoTokenizer.from_pretrained(path).encode(p) for p in PROMPTS]
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    with LLM(str(path), device="cpu", dtype="float32", enable_lora=True, max_lora_rank=8,
             lora_modules={"biased": str(adapter)}) as llm:
        outs = llm.generate(prompts + prompts, params, adapter=["biased"] * len(prompts) + [None] * len(prompts))
    tokens = [o.outputs[0].token_ids for o in outs]
    with_adapter = peft_greedy(path, adapter, prompts, NEW_TOKENS)
    assert tokens[:len(prompts)] == with_adapter
    assert tokens[len(prompts):] == peft_greedy(path, None, prompts, NEW_TOKENS)
    assert with_adapter != tokens[len(prompts):]  # the adapter changes the output: the check can fail


def test_biased_llama_under_tensor_parallelism(tmp_path: Path) -> None:
    """Two ranks over gloo: the row-parallel o_proj and down_proj biases join the sum once."""
    path = biased_model(tmp_path, "llama", attention_bias=True, mlp_bias=True)
    prompts = [AutoTokenizer.from_pretrained(path).encode(p) for p in PROMPTS]
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    runs = []
    for tp in (1, 2):
        with LLM(str(path), device="cpu", dtype="float32", num_blocks=64, tensor_parallel_size=tp) as llm:
            runs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params)])
    assert runs[0] == runs[1]
