"""Draft models that differ from their target in shape, built from the tiny models for the
speculative-decoding robustness tests (tests/test_spec_pairs.py): every draft here shares the
target's tokenizer (copied in where the draft's own family has another), so it is a valid draft
whatever its shape, and greedy outputs must equal the target's without speculation.

Random drafts are almost never right, so equal outputs alone would not show that the draft ran
correctly. The `*_copy` drafts are the target itself written in another form (another family's
config, another KV-head layout, untied, a shorter context): every proposal must then be accepted,
which only holds if the draft's own forward (its KV shape, biases, positions) is right."""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from agentserve.model.arch_config import ArchConfig
from agentserve.testing import tiny_model_cached

# The files that make up a tiny model's tokenizer (and its chat template and EOS ids).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def _copy(source: Path, prefix: str) -> Path:
    out = Path(tempfile.mkdtemp(prefix=prefix))
    shutil.copytree(source, out, dirs_exist_ok=True)
    return out


def _edit_config(path: Path, **changes: Any) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config, indent=2))


@functools.lru_cache(maxsize=None)
def shaped_draft(arch: str, **shape: Any) -> str:
    """A random model of `arch` (the target's family and tokenizer) with make_tiny_model's `shape`
    arguments (num_layers, hidden_size, num_heads, num_kv_heads, head_dim, tie_word_embeddings,
    max_position_embeddings, ...)."""
    return str(tiny_model_cached(arch, seed=7, **shape))


@functools.lru_cache(maxsize=None)
def foreign_family_draft(target_arch: str, draft_arch: str) -> str:
    """A `draft_arch` model (another family: layers, biases, qk-norm, rope of its own) given the
    target's tokenizer and embedding rows: same vocabulary, other architecture."""
    target = tiny_model_cached(target_arch)
    rows = ArchConfig.from_dir(target).vocab_size
    out = _copy(tiny_model_cached(draft_arch, seed=7, vocab_size=rows), f"{draft_arch}-for-{target_arch}-")
    for stale in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"):
        (out / stale).unlink(missing_ok=True)
    for name in TOKENIZER_FILES:
        if (target / name).is_file():
            shutil.copy(target / name, out / name)
    target_config = json.loads((target / "config.json").read_text())
    _edit_config(out, bos_token_id=target_config.get("bos_token_id"), eos_token_id=target_config.get("eos_token_id"),
                 pad_token_id=target_config.get("pad_token_id"))
    return str(out)


@functools.lru_cache(maxsize=None)
def sliding_window_draft(arch: str, window: int) -> str:
    """`arch`'s small draft whose config limits attention to a sliding window the target does not have
    (the draft attends in full: its proposals are guesses either way, verified by the target)."""
    out = _copy(tiny_model_cached(arch, seed=7, num_layers=1), f"window-{window}-draft-")
    _edit_config(out, sliding_window=window, use_sliding_window=True)
    return str(out)


@functools.lru_cache(maxsize=None)
def rope_scaled_draft(arch: str, rope_type: str, factor: float) -> str:
    """`arch`'s small draft with a rope_scaling entry of its own (the target has none, or another)."""
    out = _copy(tiny_model_cached(arch, seed=7, num_layers=1), f"rope-{rope_type}-draft-")
    scaling: dict[str, Any] = {"rope_type": rope_type, "factor": factor}
    if rope_type == "yarn":
        scaling["original_max_position_embeddings"] = 256
    _edit_config(out, rope_scaling=scaling)
    return str(out)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def _save_weights(path: Path, weights: dict[str, torch.Tensor]) -> None:
    save_file({k: v.contiguous() for k, v in weights.items()}, str(path / "model.safetensors"))


@functools.lru_cache(maxsize=None)
def untied_copy(arch: str) -> str:
    """A tied target written with its own lm_head (tie_word_embeddings false)."""
    target = tiny_model_cached(arch)
    assert ArchConfig.from_dir(target).tie_word_embeddings, f"the tiny {arch} is untied already"
    out = _copy(target, f"untied-{arch}-")
    weights = _weights(out)
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    _save_weights(out, weights)
    _edit_config(out, tie_word_embeddings=False)
    return str(out)


@functools.lru_cache(maxsize=None)
def llama_copy_of_qwen2() -> str:
    """The tiny qwen2 as a LlamaForCausalLM: Llama with attention_bias has q/k/v biases (Qwen2's) and an
    o_proj bias (zero here): the same function under another family's config."""
    out = _copy(tiny_model_cached("qwen2"), "llama-copy-of-qwen2-")
    weights = _weights(out)
    for name in [n for n in weights if n.endswith("self_attn.o_proj.weight")]:
        weights[name.replace(".weight", ".bias")] = torch.zeros(weights[name].shape[0], dtype=weights[name].dtype)
    _save_weights(out, weights)
    _edit_config(out, architectures=["LlamaForCausalLM"], model_type="llama", attention_bias=True)
    return str(out)


@functools.lru_cache(maxsize=None)
def mistral_copy_of_llama() -> str:
    """The tiny llama as a MistralForCausalLM (full attention): the same weights, another family."""
    out = _copy(tiny_model_cached("llama"), "mistral-copy-of-llama-")
    _edit_config(out, architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=None)
    return str(out)


@functools.lru_cache(maxsize=None)
def more_kv_heads_copy(arch: str) -> str:
    """The target with each KV head repeated for its query heads (GQA written as MHA): the draft's KV
    pages have twice the target's heads, its attention computes the same function."""
    target = tiny_model_cached(arch)
    shape = ArchConfig.from_dir(target)
    repeat = shape.num_heads // shape.num_kv_heads
    assert repeat > 1, f"the tiny {arch} has as many KV heads as query heads"
    out = _copy(target, f"mha-{arch}-")
    weights = _weights(out)
    for name in [n for n in weights if ".k_proj." in n or ".v_proj." in n]:
        w = weights[name]
        per_head = w.reshape(shape.num_kv_heads, shape.head_dim, *w.shape[1:])
        weights[name] = per_head.repeat_interleave(repeat, dim=0).reshape(-1, *w.shape[1:])
    _save_weights(out, weights)
    _edit_config(out, num_key_value_heads=shape.num_heads)
    return str(out)


@functools.lru_cache(maxsize=None)
def short_context_copy(arch: str, max_position_embeddings: int) -> str:
    """The target claiming a shorter context (max_position_embeddings) than the engine serves."""
    out = _copy(tiny_model_cached(arch), f"short-{arch}-")
    _edit_config(out, max_position_embeddings=max_position_embeddings)
    return str(out)
