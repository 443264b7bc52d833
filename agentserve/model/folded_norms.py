"""RMSNorm weights folded into the projections that read them: a one-token forward without norm kernels.

A Llama-family layer normalises its residual stream x before qkv_proj (input_layernorm) and before
gate_up_proj (post_attention_layernorm), and rms_norm(x) * g @ W^T = rsqrt(mean(x^2) + eps) * (x @ (W g)^T).
`fold_norms` multiplies W's columns by g once at load and sets g to 1, so every path of the model
computes the same function as before. A one-token forward (batch-1 decode, a draft step) then runs,
per layer, four fused GEMVs and no norm kernel:

    qkv      = rsqrt(mean(x^2) + eps) * (x @ W_qkv'^T)   the statistic from the GEMV's own K loop
    x        = x + o_proj(attention)                      the add in the o GEMV's epilogue
    act      = silu(gate) * up of the normalised x        the statistic from the gate_up GEMV's K loop
    x        = x + down_proj(act)                         the add in the down GEMV's epilogue

(kernels/gemv.py HAS_NORM / HAS_RESIDUAL, kernels/gemv_silu.py HAS_NORM). That removes the 2 norm
kernels of every layer (64 of an 8B step's 65; the final norm before the lm_head stays). Every GEMV
program reads all of x anyway, so the statistic costs FMAs, not traffic: unlike the ninth session's
fused norm (a second pass over x and the norm weight per program) and the fourteenth's epilogue norm
(a cross-program reduction, a fence per program), both measured slower (benchmarks/NOTES.md).

Where: 16-bit unquantized qkv / o / gate_up / down on the Triton GEMV's device, tensor-parallel size 1
(a row-parallel output is partial before its all-reduce), no LoRA (adapters read the normalised input:
a LoRA-wrapped projection is not a LinearBase). AGENTSERVE_FOLD_NORMS=0 turns it off. Numerics: the
folded weights are rounded once to the model dtype and the normalised x is not rounded before the
product, so results are close to, not bitwise equal with, the unfolded model.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from agentserve.kernels._triton_utils import num_sms, triton_enabled_for
from agentserve.kernels.gemv import gemv_config, gemv_triton, use_triton_gemv
from agentserve.kernels.gemv_silu import gemv_silu_mul_triton
from agentserve.model.attention import ForwardMetadata
from agentserve.model.linear import LinearBase
from agentserve.model.quant import UnquantizedLinearMethod

if TYPE_CHECKING:
    from agentserve.model.llama import CausalLM, DecoderLayer

FOLD_NORMS: bool = os.environ.get("AGENTSERVE_FOLD_NORMS", "1") == "1"
_ROWS_PER_CHUNK = 4096  # rows scaled per fp32 temporary while folding (bounds the extra memory)


def _foldable(proj: torch.nn.Module, require_triton: bool) -> bool:
    """An unquantized linear layer; with `require_triton`, one whose one-token product the 16-bit Triton
    GEMV computes (elsewhere the folded forward's torch reference would replace a norm kernel by several
    torch ops)."""
    if not isinstance(proj, LinearBase) or not isinstance(proj.quant_method, UnquantizedLinearMethod):
        return False
    weight = proj.weight
    return not require_triton or (weight.dtype in (torch.float16, torch.bfloat16) and triton_enabled_for(weight))


def fold_norms(model: CausalLM, *, require_triton: bool = True) -> bool:
    """Folds every layer's two RMSNorm weights into qkv_proj and gate_up_proj (the norms keep weight 1)
    and marks the model so its one-token forwards take `folded_forward`. Returns whether it folded.
    `require_triton`: only where the Triton GEMV runs (the fused kernels); False folds anywhere (the
    one-token forward then runs its torch reference, which tests compare with the unfolded model)."""
    if not FOLD_NORMS or model.norms_folded or model.tp is not None:
        return False
    layers = [model.decoder_layer(i) for i in range(len(model.layers))]
    projections = [p for layer in layers for p in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                                   layer.mlp.gate_up_proj, layer.mlp.down_proj)]
    if not all(_foldable(p, require_triton) for p in projections):
        return False
    with torch.no_grad():
        for layer in layers:
            _fold(layer.input_layernorm.weight, layer.self_attn.qkv_proj.weight)
            _fold(layer.post_attention_layernorm.weight, layer.mlp.gate_up_proj.weight)
    model.norms_folded = True
    return True


def _fold(norm_weight: torch.Tensor, weight: torch.Tensor) -> None:
    """weight[:, k] *= norm_weight[k] (in fp32, rounded once), then norm_weight = 1."""
    scale = norm_weight.float()
    for start in range(0, weight.shape[0], _ROWS_PER_CHUNK):
        rows = weight[start:start + _ROWS_PER_CHUNK]
        rows.copy_(rows.float() * scale)
    norm_weight.fill_(1.0)


def folded_forward(model: CausalLM, input_ids: torch.Tensor, positions: torch.Tensor,
                   kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: ForwardMetadata) -> torch.Tensor:
    """CausalLM.forward for one token of a folded model: the final hidden state [1, hidden]."""
    x = model.embed_tokens(input_ids)
    for i, kv_cache in enumerate(kv_caches):
        x = _layer(model.decoder_layer(i), x, positions, model.cos_sin_cache, kv_cache, meta)
    return model.norm(x)[0]


def _layer(layer: DecoderLayer, x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
           kv_cache: tuple[torch.Tensor, torch.Tensor], meta: ForwardMetadata) -> torch.Tensor:
    attn, mlp = layer.self_attn, layer.mlp
    qkv = _normed_linear(attn.qkv_proj, x, layer.input_layernorm.eps)
    x = _plus_linear(attn.o_proj, attn.attend(qkv, positions, cos_sin, kv_cache, meta), x)
    act = _normed_silu_and_mul(mlp.gate_up_proj, x, layer.post_attention_layernorm.eps)
    return _plus_linear(mlp.down_proj, act, x)


def _fma_tiles(proj: LinearBase, x: torch.Tensor) -> bool:
    """Whether the projection's Triton GEMV runs an fma tile for x (the fused kernels need one)."""
    weight = proj.weight
    if not use_triton_gemv(x, weight):
        return False
    m = x.numel() // x.shape[-1]
    return gemv_config(m, weight.shape[0], weight.shape[1], num_sms(x.device)).kind == "fma"


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """The reference: rms_norm with weight 1, rounded to the model dtype (kernels/rmsnorm.py)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _normed_linear(proj: LinearBase, x: torch.Tensor, eps: float) -> torch.Tensor:
    if _fma_tiles(proj, x):
        return gemv_triton(x, proj.weight, proj.bias, norm_eps=eps)
    return F.linear(_rms(x, eps), proj.weight, proj.bias)


def _plus_linear(proj: LinearBase, a: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    if _fma_tiles(proj, a):
        return gemv_triton(a, proj.weight, proj.bias, residual=residual)
    return residual + F.linear(a, proj.weight, proj.bias)


def _normed_silu_and_mul(proj: LinearBase, x: torch.Tensor, eps: float) -> torch.Tensor:
    weight = proj.weight
    if _fma_tiles(proj, x):
        config = gemv_config(x.numel() // x.shape[-1], weight.shape[0], weight.shape[1], num_sms(x.device))
        return gemv_silu_mul_triton(x, weight, config, bias=proj.bias, norm_eps=eps)
    gate, up = F.linear(_rms(x, eps), weight, proj.bias).chunk(2, dim=-1)
    return F.silu(gate) * up
