"""Llama, Mistral, Qwen2 and Qwen3 through one class and config flags (gpt-fast style plain code).

Differences handled by flags: qkv bias (Qwen2; Llama / Qwen3 with attention_bias, o_proj too), MLP
biases (Llama's mlp_bias), per-head q/k RMSNorm (Qwen3), tied embeddings, explicit head_dim, rope
scaling (model/rope_scaling.py). Weights use vLLM's fused layout (qkv_proj, gate_up_proj)
in the tensor-parallel layers of linear.py and embedding.py; each parameter's weight_loader fills
its slice from the Hugging Face tensors. Every layer receives the step's ForwardMetadata.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from agentserve.kernels.rope_kv_write import rope_and_write_kv
from agentserve.model.arch_config import ArchConfig
from agentserve.model.attention import ForwardMetadata, paged_attention_layer
from agentserve.model.embedding import ParallelLMHead, VocabParallelEmbedding
from agentserve.model.layers import GatedMLP, RMSNorm
from agentserve.model.linear import QKVParallelLinear, RowParallelLinear
from agentserve.parallel.shard import TPShard


def _tp_place(tp: Optional[TPShard]) -> tuple[int, int]:
    """The size and rank a parallel layer is built with (tensor-parallel size 1 without a shard)."""
    return (1, 0) if tp is None else (tp.size, tp.rank)


class Attention(nn.Module):
    def __init__(self, cfg: ArchConfig, tp: Optional[TPShard] = None) -> None:
        super().__init__()
        self.head_dim = cfg.head_dim
        tp_size, tp_rank = _tp_place(tp)
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads,
                                          bias=cfg.attention_bias, tp_size=tp_size, tp_rank=tp_rank)
        # this rank's heads (all of them at tensor-parallel size 1)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim ** -0.5
        self.o_proj = RowParallelLinear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.o_proj_bias,
                                        tp_size=tp_size, tp_rank=tp_rank, all_reduce=tp.all_reduce if tp else None)
        self.q_norm: Optional[RMSNorm] = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm: Optional[RMSNorm] = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        # Scales of an fp8 KV cache (stored = value / scale; 1.0: e4m3's range +-448 holds the K and V
        # values of the models served here). Buffers, not parameters: checkpoints need not carry them.
        self.k_scale: torch.Tensor
        self.v_scale: torch.Tensor
        self.register_buffer("k_scale", torch.ones(1, dtype=torch.float32), persistent=False)
        self.register_buffer("v_scale", torch.ones(1, dtype=torch.float32), persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor], meta: ForwardMetadata) -> torch.Tensor:
        num_tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(num_tokens, self.num_heads, self.head_dim)
        k = k.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        # [Qwen3 per-head q/k RMSNorm,] rotary, and the K/V write into the pages: one kernel.
        q_norm_w = self.q_norm.weight if self.q_norm is not None else None
        k_norm_w = self.k_norm.weight if self.k_norm is not None else None
        eps = self.q_norm.eps if self.q_norm is not None else 0.0
        q = rope_and_write_kv(q, k, v, positions, cos_sin, kv_cache[0], kv_cache[1], meta.slot_mapping,
                              q_norm_w, k_norm_w, eps, self.k_scale, self.v_scale)
        out = paged_attention_layer(q, kv_cache[0], kv_cache[1], meta, self.scale, self.k_scale, self.v_scale)
        return self.o_proj(out.reshape(num_tokens, self.q_size))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ArchConfig, tp: Optional[TPShard] = None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, tp)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, tp, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor], positions: torch.Tensor,
                cos_sin: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor],
                meta: ForwardMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, positions, cos_sin, kv_cache, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h, meta), residual


class CausalLM(nn.Module):
    """`tp`: this rank's shard under tensor parallelism (parallel/); None builds the whole model."""

    def __init__(self, cfg: ArchConfig, tp: Optional[TPShard] = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.tp = tp  # start-up work that spans the ranks (KV scale calibration, LoRA slots) reads it
        tp_size, tp_rank = _tp_place(tp)
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp_size, tp_rank,
                                                   all_reduce=tp.all_reduce if tp else None)
        self.layers = nn.ModuleList(DecoderLayer(cfg, tp) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp_size, tp_rank,
                                      all_gather=tp.gather_logits if tp else None)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("cos_sin_cache", torch.empty(0), persistent=False)
        # Set when the checkpoint carried fp8 KV-cache scales (else the runner calibrates them).
        self.kv_scales_loaded = False

    def decoder_layer(self, index: int) -> DecoderLayer:
        """self.layers[index] as its class (nn.ModuleList types its items as plain Modules)."""
        layer = self.layers[index]
        assert isinstance(layer, DecoderLayer)
        return layer

    def set_rope_cache(self, cos_sin_cache: torch.Tensor) -> None:
        self.cos_sin_cache = cos_sin_cache

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: ForwardMetadata) -> torch.Tensor:
        """Returns the final hidden states [T, hidden] (logits are computed for sampled rows only)."""
        x = self.embed_tokens(input_ids)
        residual: Optional[torch.Tensor] = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, positions, self.cos_sin_cache, kv_cache, meta)
        return self.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden)
