"""Model directories as users bring them, beyond what transformers' own save_pretrained writes: a
config.json without `architectures` (transformers then goes by model_type), keys left out that
transformers fills with its per-family defaults, and checkpoints lacking a tensor (the error names
the checkpoint's tensor, not the engine's fused parameter)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from agentserve import SamplingParams
from agentserve.llm import LLM
from agentserve.model.arch_config import ArchConfig, ModelLoadError
from agentserve.testing import tiny_model_cached

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
PROMPTS = ["The quick brown fox", "def fibonacci(n):"]


def _copy_with_config(tmp_path: Path, arch: str, edit: dict[str, Any], drop: tuple[str, ...] = ()) -> Path:
    path = tmp_path / f"{arch}-edited"
    shutil.copytree(tiny_model_cached(arch), path)
    cfg = json.loads((path / "config.json").read_text())
    for key in drop:
        cfg.pop(key, None)
    (path / "config.json").write_text(json.dumps(dict(cfg, **edit)))
    return path


def _tokens(path: Path) -> list[list[int]]:
    with LLM(str(path), device="cpu", dtype="float32", num_blocks=32) as llm:
        return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]


def test_config_without_architectures_goes_by_model_type(tmp_path: Path) -> None:
    """transformers' AutoModelForCausalLM maps model_type to the class when config.json names no
    architectures (a config written with Config(...).save_pretrained has none)."""
    path = _copy_with_config(tmp_path, "qwen2", {}, drop=("architectures",))
    assert ArchConfig.from_dir(path).architecture == "Qwen2ForCausalLM"
    assert _tokens(path) == _tokens(tiny_model_cached("qwen2"))


def test_unsupported_model_type_without_architectures_is_named() -> None:
    with pytest.raises(ModelLoadError, match="unsupported architecture 'gemma'"):
        ArchConfig.from_dict({"model_type": "gemma", "hidden_size": 64, "num_attention_heads": 4,
                              "vocab_size": 128, "intermediate_size": 128, "num_hidden_layers": 2})


@pytest.mark.parametrize("dropped", ["model.layers.1.mlp.up_proj.weight", "model.layers.0.self_attn.v_proj.weight",
                                     "model.layers.1.input_layernorm.weight", "lm_head.weight"])
def test_a_missing_tensor_is_named_as_the_checkpoint_names_it(tmp_path: Path, dropped: str) -> None:
    """The error names the tensor the user can look for in the checkpoint (model.layers.1.mlp.up_proj.weight),
    not the engine's fused parameter (layers.1.mlp.gate_up_proj.weight) nor the shard that is present."""
    from safetensors.torch import load_file, save_file

    path = tmp_path / "lacking"
    shutil.copytree(tiny_model_cached("llama"), path)  # untied: the checkpoint has its own lm_head
    tensors = load_file(str(path / "model.safetensors"))
    del tensors[dropped]
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="checkpoint lacks tensors") as err:
        LLM(str(path), device="cpu", dtype="float32", num_blocks=16)
    assert f"['{dropped}']" in str(err.value)
