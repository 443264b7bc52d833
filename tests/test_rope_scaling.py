"""RoPE scaling types from config.json against transformers: the frequencies and attention factor
its own rope functions compute, and greedy tokens + logprobs of a tiny model whose config.json
carries the scaling (YaRN as Qwen2.5 / Qwen3 model cards add it, dynamic NTK, linear); unsupported
types are a start-up error naming the type; YaRN extends the served context as vLLM derives it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from agentserve import SamplingParams
from agentserve.llm import LLM
from agentserve.model.arch_config import ArchConfig, ModelLoadError
from agentserve.model.rope_scaling import normalized_rope_scaling, rope_frequencies, scaled_max_positions
from agentserve.testing import tiny_model_cached
from helpers.logprobs_close import assert_close_greedy, greedy_result, hf_greedy
from helpers.model_variants import with_config

YARN_CASES: dict[str, dict[str, Any]] = {
    "qwen-card": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    "no-truncate": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32,
                    "truncate": False, "beta_fast": 16, "beta_slow": 2},
    "mscale": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
               "mscale": 0.707, "mscale_all_dim": 1.0},
    "attention-factor": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 128,
                         "attention_factor": 0.9},
    "factor-from-lengths": {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 64},
    # transformers reads a missing original context as max_position_embeddings
    "no-original-context": {"rope_type": "yarn", "factor": 4.0},
}


def _hf_frequencies(rope_scaling: dict[str, Any], head_dim: int = 64, max_positions: int = 256) -> tuple[torch.Tensor, float]:
    config = AutoConfig.for_model("llama", hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                                  max_position_embeddings=max_positions, rope_theta=10000.0,
                                  rope_scaling=dict(rope_scaling))
    return ROPE_INIT_FUNCTIONS["yarn"](config, torch.device("cpu"))


@pytest.mark.parametrize("case", list(YARN_CASES))
def test_yarn_frequencies_match_transformers(case: str) -> None:
    raw = YARN_CASES[case]
    ref_inv_freq, ref_factor = _hf_frequencies(raw)
    ours = rope_frequencies(64, 10000.0, normalized_rope_scaling(raw, 256))
    assert torch.equal(ours.inv_freq, ref_inv_freq.float()), case
    assert ours.attention_factor == pytest.approx(ref_factor, rel=1e-12), case
    assert ours.attention_factor != 1.0 or case == "factor-from-lengths"


def scaled_model(tmp_path: Path, arch: str, rope_scaling: dict[str, Any], max_positions: int) -> Path:
    return with_config(tmp_path, arch, f"{arch}-scaled", rope_scaling=rope_scaling,
                       max_position_embeddings=max_positions)


PROMPT = ("Once upon a time there lived a king who had three daughters, and the youngest of them was so "
          "beautiful that the sun itself, which has seen so much, was astonished whenever it shone on her "
          "face. Close by the king's castle lay a great dark forest, and under an old lime-tree")
NEW_TOKENS = 24


@pytest.mark.parametrize("arch,rope_scaling", [
    ("qwen2", {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}),
    ("qwen3", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}),
    ("llama", {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 48,
               "mscale": 0.707, "mscale_all_dim": 1.0}),
    ("mistral", {"type": "linear", "factor": 2.0}),
    ("llama", {"type": "dynamic", "factor": 4.0}),
    # no original_max_position_embeddings: transformers takes max_position_embeddings
    ("qwen2", {"type": "yarn", "factor": 4.0}),
    ("llama", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}),
])
def test_scaled_model_matches_transformers(tmp_path: Path, arch: str, rope_scaling: dict[str, Any]) -> None:
    _assert_greedy_matches_transformers(scaled_model(tmp_path, arch, rope_scaling, max_positions=256), arch,
                                        rope_scaling)


def test_linear_scaling_serves_past_max_position_embeddings(tmp_path: Path) -> None:
    """vicuna-7b-v1.5-16k's shape (4096 with linear factor 4): max_position_embeddings 32 with factor 8 serves
    256 positions, the same tokens as transformers (which runs any length) over a prompt and reply past 32."""
    rope_scaling = {"type": "linear", "factor": 8.0}
    path = scaled_model(tmp_path, "llama", rope_scaling, max_positions=32)
    assert LLM(str(path), device="cpu", dtype="float32").engine.max_model_len == 256
    _assert_greedy_matches_transformers(path, "llama", rope_scaling)


def _assert_greedy_matches_transformers(path: Path, arch: str, rope_scaling: dict[str, Any]) -> None:
    prompt = AutoTokenizer.from_pretrained(path).encode(PROMPT)
    assert len(prompt) > 48  # past the original context of every YaRN case: the interpolated band matters
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ref_ids, ref_lps = hf_greedy(model, prompt, NEW_TOKENS)
    llm = LLM(str(path), device="cpu", dtype="float32", max_num_batched_tokens=16, block_size=8)
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, logprobs=5,
                                                ignore_eos=True))
    got = greedy_result(out)
    assert got[0][0] == ref_ids, f"{arch} {rope_scaling}: tokens differ"
    assert_close_greedy(([ref_ids], [ref_lps]), got, f"{arch} {rope_scaling}")
    for pos, ref_top in enumerate(ref_lps):
        for token, logprob in ref_top.items():
            if token in got[1][0][pos]:
                assert abs(got[1][0][pos][token] - logprob) < 1e-3, (arch, pos, token)


def test_yarn_changes_outputs(tmp_path: Path) -> None:
    """The check above could pass if the scaling were ignored on both sides: plain RoPE must differ."""
    plain = tiny_model_cached("qwen2")
    scaled = scaled_model(tmp_path, "qwen2", {"type": "yarn", "factor": 4.0,
                                               "original_max_position_embeddings": 32}, 256)
    prompt = AutoTokenizer.from_pretrained(plain).encode(PROMPT)
    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=5)
    lp_plain = LLM(str(plain), device="cpu", dtype="float32").generate([prompt], params)[0].outputs[0].logprobs[0]
    lp_scaled = LLM(str(scaled), device="cpu", dtype="float32").generate([prompt], params)[0].outputs[0].logprobs[0]
    assert {t: round(v.logprob, 4) for t, v in lp_plain.items()} != {t: round(v.logprob, 4) for t, v in lp_scaled.items()}


def _arch(rope_scaling: Any, max_positions: int = 32768) -> ArchConfig:
    return ArchConfig.from_dict({"architectures": ["Qwen2ForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
                                 "vocab_size": 128, "intermediate_size": 128, "num_hidden_layers": 2,
                                 "max_position_embeddings": max_positions, "rope_scaling": rope_scaling})


def test_served_context_follows_yarn_like_vllm() -> None:
    yarn = _arch({"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768})
    assert scaled_max_positions(yarn.rope_scaling, yarn.max_position_embeddings) == 131072
    # Qwen3 ships max_position_embeddings 40960 over a 32k original context.
    qwen3 = _arch({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}, 40960)
    assert scaled_max_positions(qwen3.rope_scaling, qwen3.max_position_embeddings) == 131072
    # without original_max_position_embeddings the original context is max_position_embeddings (transformers)
    no_original = _arch({"type": "yarn", "factor": 4.0}, 40960)
    assert scaled_max_positions(no_original.rope_scaling, no_original.max_position_embeddings) == 163840
    # linear scaling stretches max_position_embeddings by its factor (vLLM's _get_and_verify_max_len: a
    # vicuna-7b-v1.5-16k-style config says 4096 with factor 4); dynamic NTK and no scaling keep it
    linear = _arch({"type": "linear", "factor": 4.0}, 4096)
    assert scaled_max_positions(linear.rope_scaling, linear.max_position_embeddings) == 16384
    for other in ({"type": "dynamic", "factor": 2.0}, None):
        arch = _arch(other)
        assert scaled_max_positions(arch.rope_scaling, arch.max_position_embeddings) == 32768


def test_dynamic_ntk_refuses_contexts_past_the_trained_one(tmp_path: Path) -> None:
    path = scaled_model(tmp_path, "llama", {"type": "dynamic", "factor": 4.0}, 256)
    with pytest.raises(ModelLoadError, match=r"max_model_len=1024 \(--max-model-len\) exceeds the model's limit of 256"):
        LLM(str(path), device="cpu", dtype="float32", max_model_len=1024)


@pytest.mark.parametrize("rope_scaling,message", [
    ({"type": "longrope", "long_factor": [1.0], "short_factor": [1.0]}, "unsupported rope_scaling type 'longrope'"),
    ({"rope_type": "mrope", "mrope_section": [16, 24, 24]}, "unsupported rope_scaling type 'mrope'"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": None}, "'original_max_position_embeddings'"),
    ({"rope_type": "llama3", "factor": 8.0}, "'low_freq_factor'"),
    ({"type": "linear", "factor": 0}, "'factor' must be a positive number, got 0"),
    ({"rope_type": "frequency_factors", "factors": [1.0, 2.0]}, "rope frequency factors have 2 entries"),
    ({"type": "yarn", "factor": "4x", "original_max_position_embeddings": 64}, "'factor' must be a positive number"),
])
def test_unsupported_or_incomplete_scaling_is_a_clear_error(tmp_path: Path, rope_scaling: dict[str, Any],
                                                             message: str) -> None:
    path = scaled_model(tmp_path, "llama", rope_scaling, 256)
    with pytest.raises(ModelLoadError, match=message):
        LLM(str(path), device="cpu", dtype="float32")
