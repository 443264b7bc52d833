"""GGUF files written the way llama.cpp's convert_hf_to_gguf.py writes them (for tests/test_gguf*.py
and tests/test_checkpoint_variants.py), from a tiny Hugging Face directory: its tensor names, the
llama rotary permutation of q / k, its metadata keys, optionally the tokenizer (`tokenizer.ggml.*`,
the GPT-2 style BPE vocabulary its `_set_vocab_gpt2` writes, with the chat template), tensor types
quantized by gguf.quants, and splits (gguf-split's `-0000i-of-0000n.gguf` shards).

`dequantized_copy` writes the Hugging Face directory holding exactly the weights a GGUF file's
tensors dequantize to: the reference the engine must reproduce token for token."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from agentserve.model.arch_config import ArchConfig
from helpers.spm_tokenizer import add_sentencepiece_vocab

_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
          "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
          "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
          "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}


def gguf_name(hf: str) -> str:
    if hf in _GLOBAL:
        return _GLOBAL[hf]
    _, _, layer, rest = hf.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_NAMES[module]}.{kind}"


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute for q / k weights and biases."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_cpp_rope_freqs(arch: ArchConfig) -> np.ndarray:
    """convert_hf_to_gguf.py's rope_freqs for a llama3 rope_scaling: per-dimension divisors."""
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


def _add_rope_scaling(writer: Any, arch: ArchConfig) -> None:
    """llama3 scaling as a rope_freqs tensor, the others as rope.scaling.* metadata."""
    import gguf

    scaling = arch.rope_scaling
    if scaling is not None and scaling["rope_type"] == "llama3":
        writer.add_tensor("rope_freqs.weight", llama_cpp_rope_freqs(arch))
    elif scaling is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType(scaling["rope_type"]))
        writer.add_rope_scaling_factor(scaling["factor"])
        if "original_max_position_embeddings" in scaling:
            writer.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])


def _weights(src: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def _add_tokenizer(writer: Any, src: Path, vocab_size: int, pre: str) -> None:
    """`_set_vocab_gpt2`: every id up to the model's vocab size ([PAD<i>] past the tokenizer's), token
    types, merges, special ids, add_bos and the chat template."""
    import gguf

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(src))
    by_id = {i: t for t, i in tok.get_vocab().items()}
    added = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(str(src), load_merges=True, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)


def write_gguf(src: Path, dst: Path, arch_name: str, *, qtype: Optional[str] = None, tokenizer_pre: Optional[str] = None,
               split_max_tensors: int = 0, drop_keys: tuple[str, ...] = (), tie: Optional[bool] = None,
               extra_tensor: Optional[tuple[str, np.ndarray]] = None, extra_keys: Optional[dict[str, int]] = None
               ) -> Path:
    """`src` as a GGUF file at `dst` (the first shard's path when splitting): 2-D tensors stored as
    `qtype` (a gguf.GGMLQuantizationType name; F32 when None); the tokenizer when `tokenizer_pre` is
    given (else only its bos / eos ids): "sentencepiece" writes a llama-type vocabulary (the directory's
    tokenizer must be sentencepiece-style: helpers/spm_tokenizer.py), any other name a GPT-2 BPE one;
    `drop_keys`: metadata keys (after the arch prefix) left out,
    as some converters do; `tie`: write no output.weight (True) even when the checkpoint has an lm_head;
    `extra_keys`: more integer metadata (after the arch prefix)."""
    import gguf

    arch = ArchConfig.from_dir(src)
    writer = gguf.GGUFWriter(str(dst), arch_name, split_max_tensors=split_max_tensors)
    keys = {"block_count": arch.num_layers, "context_length": arch.max_position_embeddings,
            "embedding_length": arch.hidden_size, "feed_forward_length": arch.intermediate_size,
            "attention.head_count": arch.num_heads, "attention.head_count_kv": arch.num_kv_heads,
            "attention.key_length": arch.head_dim, "attention.value_length": arch.head_dim,
            "rope.freq_base": float(arch.rope_theta), "attention.layer_norm_rms_epsilon": float(arch.rms_norm_eps),
            "vocab_size": arch.vocab_size, **(extra_keys or {})}
    for key, value in keys.items():
        if key not in drop_keys:
            kind = gguf.GGUFValueType.FLOAT32 if isinstance(value, float) else gguf.GGUFValueType.UINT32
            writer.add_key_value(f"{arch_name}.{key}", value, kind)
    if tokenizer_pre == "sentencepiece":
        add_sentencepiece_vocab(writer, src, arch.vocab_size)
    elif tokenizer_pre is not None:
        _add_tokenizer(writer, src, arch.vocab_size, tokenizer_pre)
    else:
        writer.add_bos_token_id(arch.bos_token_id or 0)
        writer.add_eos_token_id(arch.eos_token_ids[0])
    _add_rope_scaling(writer, arch)
    tied = arch.tie_word_embeddings if tie is None else tie
    quant = gguf.GGMLQuantizationType[qtype] if qtype is not None else None
    for name, t in _weights(src).items():
        if name == "lm_head.weight" and tied:
            continue
        w = t.float().numpy()
        if arch_name == "llama" and ".q_proj." in name:
            w = llama_cpp_permute(w, arch.num_heads)
        elif arch_name == "llama" and ".k_proj." in name:
            w = llama_cpp_permute(w, arch.num_kv_heads)
        w = np.ascontiguousarray(w)
        if quant is not None and w.ndim == 2:  # llama.cpp keeps norms (1-D) in F32
            writer.add_tensor(gguf_name(name), gguf.quants.quantize(w, quant), raw_dtype=quant)
        else:
            writer.add_tensor(gguf_name(name), w)
    if extra_tensor is not None:
        writer.add_tensor(*extra_tensor)
    shards = writer.format_shard_names(dst)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return shards[0]


def dequantized_copy(src: Path, dst: Path, qtype: str, tie: Optional[bool] = None) -> Path:
    """A copy of the Hugging Face directory `src` whose 2-D weights are what `qtype` blocks of them
    dequantize to (rows are quantized independently, so llama's permutation commutes with it)."""
    import gguf

    quant = gguf.GGMLQuantizationType[qtype]
    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors*"):
        f.unlink()
    tensors = {}
    for name, t in _weights(src).items():
        w = t.float().numpy()
        if w.ndim == 2:
            w = gguf.quants.dequantize(gguf.quants.quantize(np.ascontiguousarray(w), quant), quant)
        tensors[name] = torch.from_numpy(np.array(w, dtype=np.float32)).contiguous()
    if tie:
        tensors.pop("lm_head.weight", None)
        config = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps(config | {"tie_word_embeddings": True}))
    save_file(tensors, str(dst / "model.safetensors"))
    return dst
