"""Builds a CausalLM from a local Hugging Face directory (single or sharded safetensors) or with
dummy weights for a config or a named shape."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open

from agentserve.model.arch_config import ArchConfig, ModelLoadError
from agentserve.model.llama import CausalLM

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "half": torch.float16,
           "float": torch.float32}

# HF tensor name suffix -> (our parameter suffix, shard index within the fused parameter or None).
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}
# Buffers some checkpoints carry that the model recomputes.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def resolve_dtype(name: str, arch: ArchConfig, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cpu":
            return torch.float32  # half-precision matmuls on CPU are slow and less exact
        return _DTYPES.get(str(arch.torch_dtype), torch.bfloat16) if arch.torch_dtype != "float32" else torch.float32
    if name not in _DTYPES:
        raise ModelLoadError(f"unknown dtype {name!r}; use one of auto, float32, float16, bfloat16")
    return _DTYPES[name]


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted({path / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{path}: shards named in model.safetensors.index.json are missing: {missing}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path} has no *.safetensors weights (only safetensors checkpoints are supported)")
    return files


def _split_sizes(model: CausalLM, fused: str) -> list[int]:
    cfg = model.cfg
    if "qkv_proj" in fused:
        return [cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim]
    return [cfg.intermediate_size, cfg.intermediate_size]


def load_weights(model: CausalLM, path: Path) -> None:
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for file in _safetensors_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for hf_name in f.keys():
                if hf_name.endswith(_IGNORED_SUFFIXES):
                    continue
                name = hf_name[len("model."):] if hf_name.startswith("model.") else hf_name
                shard: Optional[int] = None
                for hf_part, (ours, idx) in _FUSED.items():
                    if f".{hf_part}." in f".{name}":
                        name, shard = name.replace(hf_part, ours), idx
                        break
                if name not in params:
                    if name == "lm_head.weight" and model.cfg.tie_word_embeddings:
                        continue  # some tied checkpoints still carry a copy
                    logger.warning("ignoring unexpected tensor %s in %s", hf_name, file.name)
                    continue
                param = params[name]
                tensor = f.get_tensor(hf_name)
                if shard is None:
                    target = param.data
                else:
                    sizes = _split_sizes(model, name)
                    start = sum(sizes[:shard])
                    target = param.data.narrow(0, start, sizes[shard])
                if tuple(tensor.shape) != tuple(target.shape):
                    raise ModelLoadError(f"tensor {hf_name} in {file.name} has shape {tuple(tensor.shape)}, "
                                         f"the config implies {tuple(target.shape)}")
                target.copy_(tensor.to(target.dtype))
                loaded.add(f"{name}:{shard}")
    expected = set()
    for name, param in params.items():
        if name == "lm_head.weight" and model.cfg.tie_word_embeddings:
            continue
        if name.endswith(("qkv_proj.weight", "qkv_proj.bias")):
            expected.update(f"{name}:{i}" for i in range(3))
        elif name.endswith("gate_up_proj.weight"):
            expected.update(f"{name}:{i}" for i in range(2))
        else:
            expected.add(f"{name}:None")
    missing = sorted(expected - loaded)
    if missing:
        raise ModelLoadError(f"{path}: checkpoint lacks tensors for {[m.split(':')[0] for m in missing][:8]}"
                             f"{' ...' if len(missing) > 8 else ''}")


def init_dummy_weights(model: CausalLM, seed: int) -> None:
    """Random weights of a sane scale (benchmarks: outputs are meaningless, use ignore_eos)."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            else:
                param.uniform_(-0.02, 0.02, generator=gen)


def build_model(arch: ArchConfig, dtype: torch.dtype, device: torch.device, path: Optional[Path],
                load_format: str, seed: int) -> CausalLM:
    torch_default = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)
        with torch.device("meta"):
            model = CausalLM(arch)
    finally:
        torch.set_default_dtype(torch_default)
    model = model.to_empty(device=device)
    if arch.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    if load_format == "dummy":
        init_dummy_weights(model, seed)
    else:
        assert path is not None
        load_weights(model, path)
    model.eval()
    model.requires_grad_(False)
    return model
