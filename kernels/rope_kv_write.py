"""Rotary embedding of q and k and the paged KV write in one launch (plus Qwen3's per-head q/k
RMSNorm before rotary).

A decode step used to run three (Qwen3: five) tiny kernels per layer here — [q norm, k norm,]
rotary, KV write — each a few microseconds of launch and tail for a few KB of data. At batch 1
that is ~3 x 32 launches per step of pure overhead, so they are fused: one program per token
loads cos/sin once, normalises and rotates its q heads in place, normalises and rotates its k
heads and stores them straight into the page slot together with v. The rotated k is not written
back to the qkv buffer: attention reads keys only from the cache. An fp8 cache gets k / k_scale and
v / v_scale rounded to e4m3 in the same store (kv_write.py).

Rounding follows the separate kernels (and so the torch references) step by step, so the fused
path gives the same bits as rms_norm -> apply_rotary -> write_kv in 16-bit dtypes.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from ._triton_utils import next_pow2, pdl_begin, pdl_launch, tl, triton, triton_enabled_for
from .fp8_utils import is_fp8, to_cache_dtype
from .kv_write import kv_scales_or_ones, write_kv, write_kv_ref
from .rmsnorm import rms_norm, rms_norm_ref
from .rotary import apply_rotary, apply_rotary_ref

# AGENTSERVE_FUSED_ROPE_KV=0 makes the dispatcher run the separate Triton kernels instead (A/B
# timing, bisecting); the torch reference path is unaffected by it.
FUSED: bool = os.environ.get("AGENTSERVE_FUSED_ROPE_KV", "1") != "0"


def rope_and_write_kv_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    q_norm_weight: Optional[torch.Tensor] = None, k_norm_weight: Optional[torch.Tensor] = None,
    eps: float = 1e-6, k_scale: Optional[torch.Tensor] = None, v_scale: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, Hq, D], k/v: [T, Hkv, D]; caches [num_blocks, page, Hkv, D]; slot -1 = skip.

    Optional per-head RMSNorm of q and k (Qwen3), then rotary, then the KV write. Returns the
    rotated (q, k) as fresh tensors; the caches are updated in place."""
    if q_norm_weight is not None:
        q = rms_norm_ref(q, q_norm_weight, eps)[0]
    if k_norm_weight is not None:
        k = rms_norm_ref(k, k_norm_weight, eps)[0]
    q, k = apply_rotary_ref(q, k, positions, cos_sin_cache)
    write_kv_ref(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    return q, k


@triton.jit
def _norm_rotate(x1, x2, w_ptr, offs, d_mask, cos, sin, eps, dt: tl.constexpr,
                 HEAD_DIM: tl.constexpr, HALF: tl.constexpr, HAS_NORM: tl.constexpr):
    """x1/x2: [BLOCK_H, BLOCK_HALF] fp32 halves of each head. Returns the rotated halves in `dt`.

    The norm rounds like _rms_norm_kernel (normalised row to dt, times weight, to dt) and the
    rotation like _rotate_heads (each product and the sum rounded to dt)."""
    if HAS_NORM:
        var = (tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / HEAD_DIM
        inv = tl.rsqrt(var + eps)[:, None]
        w1 = tl.load(w_ptr + offs, mask=d_mask, other=0.0).to(tl.float32)[None, :]
        w2 = tl.load(w_ptr + HALF + offs, mask=d_mask, other=0.0).to(tl.float32)[None, :]
        x1 = (w1 * (x1 * inv).to(dt).to(tl.float32)).to(dt).to(tl.float32)
        x2 = (w2 * (x2 * inv).to(dt).to(tl.float32)).to(dt).to(tl.float32)
    c = cos.to(dt).to(tl.float32)[None, :]
    s = sin.to(dt).to(tl.float32)[None, :]
    out1 = ((x1 * c).to(dt).to(tl.float32) - (x2 * s).to(dt).to(tl.float32)).to(dt)
    out2 = ((x2 * c).to(dt).to(tl.float32) + (x1 * s).to(dt).to(tl.float32)).to(dt)
    return out1, out2


@triton.jit
def _rope_kv_write_kernel(
    q_ptr, k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, positions_ptr, slot_mapping_ptr, cos_sin_ptr,
    q_norm_ptr, k_norm_ptr, k_scale_ptr, v_scale_ptr, eps,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch, stride_cs,
    NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, PAGE_SIZE: tl.constexpr,
    HAS_NORM: tl.constexpr, KV_FP8: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    """Grid: (T,). One program per token: all q heads (rotated in place), all kv heads (to the page).

    The step's positions and slots (filled before the step's first kernel), the cos/sin rows and
    the fp8 scales load before the PDL wait: a chain of dependent loads (position, then its cos/sin
    row) off the critical path; q, k and v (the projection's output) load after it."""
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    offs = tl.arange(0, BLOCK_HALF)
    d_mask = offs < HALF
    cos = tl.load(cos_sin_ptr + pos * stride_cs + offs, mask=d_mask, other=0.0)
    sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + offs, mask=d_mask, other=0.0)
    # -1 marks padding (CUDA-graph batches): its k/v are not written anywhere.
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    k_scale = 1.0
    v_scale = 1.0
    if KV_FP8:
        k_scale = tl.load(k_scale_ptr).to(tl.float32)
        v_scale = tl.load(v_scale_ptr).to(tl.float32)
    pdl_begin(USE_PDL)  # programmatic dependent launch: kernels/_triton_utils.py

    # q: normalise + rotate in place. Same thread loads and stores each element: in place is safe.
    dt_q = q_ptr.dtype.element_ty
    offs_hq = tl.arange(0, BLOCK_HQ)
    mask_q = (offs_hq[:, None] < NUM_Q_HEADS) & d_mask[None, :]
    q_src = q_ptr + token * stride_qt + offs_hq[:, None] * stride_qh + offs[None, :]
    q1 = tl.load(q_src, mask=mask_q, other=0.0).to(tl.float32)
    q2 = tl.load(q_src + HALF, mask=mask_q, other=0.0).to(tl.float32)
    q1, q2 = _norm_rotate(q1, q2, q_norm_ptr, offs, d_mask, cos, sin, eps, dt_q, HEAD_DIM, HALF, HAS_NORM)
    tl.store(q_src, q1, mask=mask_q)
    tl.store(q_src + HALF, q2, mask=mask_q)

    if slot < 0:
        return
    block = slot // PAGE_SIZE
    offset = slot % PAGE_SIZE
    dt_k = k_ptr.dtype.element_ty
    offs_hk = tl.arange(0, BLOCK_HK)
    mask_k = (offs_hk[:, None] < NUM_KV_HEADS) & d_mask[None, :]
    k_src = k_ptr + token * stride_kt + offs_hk[:, None] * stride_kh + offs[None, :]
    k1 = tl.load(k_src, mask=mask_k, other=0.0).to(tl.float32)
    k2 = tl.load(k_src + HALF, mask=mask_k, other=0.0).to(tl.float32)
    k1, k2 = _norm_rotate(k1, k2, k_norm_ptr, offs, d_mask, cos, sin, eps, dt_k, HEAD_DIM, HALF, HAS_NORM)
    kc_ty = k_cache_ptr.dtype.element_ty
    k_dst = k_cache_ptr + block * stride_kcb + offset * stride_kcs + offs_hk[:, None] * stride_kch + offs[None, :]
    tl.store(k_dst, to_cache_dtype(k1, k_scale, kc_ty, KV_FP8), mask=mask_k)
    tl.store(k_dst + HALF, to_cache_dtype(k2, k_scale, kc_ty, KV_FP8), mask=mask_k)

    vc_ty = v_cache_ptr.dtype.element_ty
    v_src = v_ptr + token * stride_vt + offs_hk[:, None] * stride_vh + offs[None, :]
    v_dst = v_cache_ptr + block * stride_vcb + offset * stride_vcs + offs_hk[:, None] * stride_vch + offs[None, :]
    v1 = tl.load(v_src, mask=mask_k, other=0.0)
    v2 = tl.load(v_src + HALF, mask=mask_k, other=0.0)
    tl.store(v_dst, to_cache_dtype(v1, v_scale, vc_ty, KV_FP8), mask=mask_k)
    tl.store(v_dst + HALF, to_cache_dtype(v2, v_scale, vc_ty, KV_FP8), mask=mask_k)


def rope_and_write_kv_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    q_norm_weight: Optional[torch.Tensor] = None, k_norm_weight: Optional[torch.Tensor] = None,
    eps: float = 1e-6, k_scale: Optional[torch.Tensor] = None, v_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Same contract as rope_and_write_kv_ref, except that q is rotated in place (returned) and the
    rotated k exists only in the cache. q/k/v may be strided views of a fused qkv output (last dim
    contiguous). No host syncs and no allocations: safe inside CUDA graph capture."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if (k.shape != v.shape or k.shape[2] != head_dim or k_cache.shape[2:] != (num_kv_heads, head_dim)
            or v_cache.shape != k_cache.shape or cos_sin_cache.shape[-1] != head_dim or head_dim % 2):
        raise ValueError(f"rope_and_write_kv shapes: q {tuple(q.shape)} k {tuple(k.shape)} v {tuple(v.shape)} "
                         f"k_cache {tuple(k_cache.shape)} cos_sin {tuple(cos_sin_cache.shape)}")
    if (q_norm_weight is None) != (k_norm_weight is None):
        raise ValueError("q_norm_weight and k_norm_weight go together")
    if q.stride(-1) != 1:
        raise ValueError("q is rotated in place: its last dim must be contiguous")
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("KV caches must be contiguous in the head dimension")
    if num_tokens == 0:
        return q
    has_norm = q_norm_weight is not None
    half = head_dim // 2
    block_hq = next_pow2(num_q_heads)
    k_scale, v_scale = kv_scales_or_ones(k_cache, k_scale, v_scale)
    _rope_kv_write_kernel[(num_tokens,)](
        q, k, v, k_cache, v_cache, positions.contiguous(), slot_mapping.contiguous(), cos_sin_cache.contiguous(),
        q_norm_weight.contiguous() if q_norm_weight is not None else q,
        k_norm_weight.contiguous() if k_norm_weight is not None else q,
        k_scale, v_scale, float(eps),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), cos_sin_cache.stride(0),
        NUM_Q_HEADS=num_q_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, HALF=half,
        BLOCK_HALF=next_pow2(half), BLOCK_HQ=block_hq, BLOCK_HK=next_pow2(num_kv_heads),
        PAGE_SIZE=k_cache.shape[1], HAS_NORM=has_norm, KV_FP8=is_fp8(k_cache),
        num_warps=4 if block_hq * half >= 1024 else 1, **pdl_launch(q),
    )
    return q


def rope_and_write_kv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    q_norm_weight: Optional[torch.Tensor] = None, k_norm_weight: Optional[torch.Tensor] = None,
    eps: float = 1e-6, k_scale: Optional[torch.Tensor] = None, v_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Dispatcher; returns the rotated q (the caller attends over the caches, never over k).

    CUDA: the fused kernel (or, with AGENTSERVE_FUSED_ROPE_KV=0, the separate Triton kernels);
    elsewhere, or with the kernel backend forced to "torch": the reference."""
    if not triton_enabled_for(q):
        return rope_and_write_kv_ref(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping,
                                     q_norm_weight, k_norm_weight, eps, k_scale, v_scale)[0]
    if FUSED:
        return rope_and_write_kv_triton(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping,
                                        q_norm_weight, k_norm_weight, eps, k_scale, v_scale)
    if q_norm_weight is not None and k_norm_weight is not None:
        q = rms_norm(q, q_norm_weight, eps)[0]
        k = rms_norm(k, k_norm_weight, eps)[0]
    q, k = apply_rotary(q, k, positions, cos_sin_cache)
    write_kv(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    return q
