"""Draft models for speculative decoding made from a model directory: the model truncated to its first
decoder layers (same vocabulary, tokenizer and chat template; embedding, final norm and head kept).
Untrained, such a draft agrees with the full model only where the last layers change little."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from agentserve.testing.tiny import build_once


def first_layers_copy(model_dir: Path, num_layers: int, cache_dir: Path) -> Path:
    """`model_dir` with only its first `num_layers` decoder layers, built once under `cache_dir`."""
    def build(dest: Path) -> None:
        dest.mkdir(parents=True, exist_ok=True)
        for f in model_dir.iterdir():
            if f.is_file() and f.name not in ("config.json", "model.safetensors"):
                shutil.copy(f, dest / f.name)
        config = json.loads((model_dir / "config.json").read_text())
        if num_layers >= config["num_hidden_layers"]:
            raise ValueError(f"the model has {config['num_hidden_layers']} layers; a draft keeps fewer")
        config["num_hidden_layers"] = num_layers
        weights = load_file(str(model_dir / "model.safetensors"))
        kept = {k: v for k, v in weights.items() if not k.startswith("model.layers.") or int(k.split(".")[2]) < num_layers}
        save_file(kept, str(dest / "model.safetensors"))
        (dest / "config.json").write_text(json.dumps(config, indent=2))

    return build_once(cache_dir / f"{model_dir.name}-first{num_layers}", build)
