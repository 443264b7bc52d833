"""GGUF files written from the tiny models the way llama.cpp's converter writes them (its tensor names;
q/k rows of llama permuted for its rotary layout; fp32 tensors, so nothing is lost; rope scaling as
metadata or a rope_freqs tensor). They carry no tokenizer metadata: only the weights and the shape."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.torch import load_file

from agentserve.model.arch_config import ArchConfig

_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
          "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
          "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
          "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute for q/k weights."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_name(hf: str) -> str:
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf in fixed:
        return fixed[hf]
    _, _, layer, rest = hf.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_NAMES[module]}.{kind}"


def _llama_cpp_rope_freqs(arch: ArchConfig) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's rope_freqs for a llama3 rope_scaling: per-dimension divisors."""
    scaling = arch.rope_scaling or {}
    freqs = 1.0 / (arch.rope_theta ** (np.arange(0, arch.head_dim, 2, dtype=np.float32) / arch.head_dim))
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    divisors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_len / high:
            divisors.append(1.0)
        elif wavelen > old_len / low:
            divisors.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(divisors, dtype=np.float32)


def write_gguf(src: Path, dst: Path, arch_name: str, extra_tensor: Any = None) -> Path:
    """`src`'s weights and shape as llama.cpp's converter writes them, rope scaling included (llama3 as
    a rope_freqs tensor, others as rope.scaling.* metadata)."""
    arch = ArchConfig.from_dir(src)
    tensors = load_file(str(src / "model.safetensors"))
    import gguf

    writer = gguf.GGUFWriter(str(dst), arch_name)
    writer.add_block_count(arch.num_layers)
    writer.add_context_length(arch.max_position_embeddings)
    writer.add_embedding_length(arch.hidden_size)
    writer.add_feed_forward_length(arch.intermediate_size)
    writer.add_head_count(arch.num_heads)
    writer.add_head_count_kv(arch.num_kv_heads)
    writer.add_key_length(arch.head_dim)
    writer.add_value_length(arch.head_dim)
    writer.add_rope_freq_base(arch.rope_theta)
    writer.add_layer_norm_rms_eps(arch.rms_norm_eps)
    writer.add_vocab_size(arch.vocab_size)
    writer.add_bos_token_id(arch.bos_token_id or 0)
    writer.add_eos_token_id(arch.eos_token_ids[0])
    scaling = arch.rope_scaling
    if scaling is not None and scaling["rope_type"] == "llama3":
        writer.add_tensor("rope_freqs.weight", _llama_cpp_rope_freqs(arch))
    elif scaling is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType(scaling["rope_type"]))
        writer.add_rope_scaling_factor(scaling["factor"])
        if "original_max_position_embeddings" in scaling:
            writer.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])
    for name, t in tensors.items():
        if name == "lm_head.weight" and arch.tie_word_embeddings:
            continue
        w = t.float().numpy()
        if arch_name == "llama" and ".q_proj." in name:
            w = _llama_cpp_permute(w, arch.num_heads)
        elif arch_name == "llama" and ".k_proj." in name:
            w = _llama_cpp_permute(w, arch.num_kv_heads)
        writer.add_tensor(_gguf_name(name), np.ascontiguousarray(w))
    if extra_tensor is not None:
        writer.add_tensor(*extra_tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst
