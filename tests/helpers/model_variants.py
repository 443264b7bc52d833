"""Tiny model directories whose config.json carries a variant the cached tiny models lack (rope scaling,
attention / MLP biases, other head shapes): copies of the cached model with the config edited, and random
biases where the variant adds them (zero biases would hide a layer that ignores them), or fresh random
weights where the variant changes the shapes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from agentserve.testing import tiny_model_cached


def with_config(tmp_path: Path, arch: str, name: str, **config: Any) -> Path:
    """A copy of the cached tiny `arch` model at tmp_path/name with `config` merged into config.json."""
    path = tmp_path / name
    shutil.copytree(tiny_model_cached(arch), path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(dict(cfg, **config), indent=2))
    return path


def biased_model(tmp_path: Path, arch: str, **flags: bool) -> Path:
    """The tiny model with `flags` (attention_bias, mlp_bias) set and every bias they create drawn at random."""
    from transformers import AutoModelForCausalLM

    path = with_config(tmp_path, arch, f"{arch}-biased", **flags)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    generator = torch.Generator().manual_seed(7)
    biases = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
                biases += 1
    assert biases > 0, f"{flags} created no bias in {arch}"
    model.save_pretrained(path)
    return path


def reshaped_model(tmp_path: Path, arch: str, name: str, **config: Any) -> Path:
    """The tiny `arch` model's tokenizer with `config` merged into its config.json and fresh random weights
    of the shapes that gives (head counts, head_dim): drawn wide enough that greedy tokens are no near-ties."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = with_config(tmp_path, arch, name, **config)
    torch.manual_seed(11)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "norm" in param_name:
                param.copy_(1 + 0.3 * torch.randn_like(param))
            else:
                param.copy_(torch.randn_like(param) * (0.5 if "embed" in param_name or "lm_head" in param_name else 0.15))
    for stale in path.glob("*.safetensors"):
        stale.unlink()
    model.save_pretrained(path)
    return path
