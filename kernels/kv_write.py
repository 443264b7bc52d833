"""Writes new keys and values into the paged KV cache at their slots (slot = block * block_size + offset).

An e4m3 cache (kv_cache_dtype="fp8") stores value / scale, saturated, with one fp32 scale per layer
for K and one for V (`k_scale`, `v_scale`: [1] device tensors, read on the device: graph safe)."""

from __future__ import annotations

from typing import Optional

import torch

from ._triton_utils import next_pow2, tl, triton, triton_enabled_for
from .fp8_utils import is_fp8, quantize_kv_ref, raw_bytes, to_cache_dtype


def kv_scales_or_ones(k_cache: torch.Tensor, k_scale: Optional[torch.Tensor],
                      v_scale: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The scales an fp8 cache needs (an error without them); a 16-bit cache ignores them, so any
    tensor serves as the kernels' unused pointer argument."""
    if k_scale is None or v_scale is None:
        if is_fp8(k_cache):
            raise ValueError("an fp8 KV cache needs k_scale and v_scale")
        return k_cache, k_cache
    return k_scale, v_scale


def to_cache_ref(x: torch.Tensor, cache: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
    """New K or V rows as the cache stores them (raw bytes for fp8, so index_copy_ works everywhere)."""
    if is_fp8(cache):
        if scale is None:
            raise ValueError("an fp8 KV cache needs k_scale and v_scale")
        return raw_bytes(quantize_kv_ref(x, scale))
    return x.to(cache.dtype)


def write_kv_ref(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor, k_scale: Optional[torch.Tensor] = None,
                 v_scale: Optional[torch.Tensor] = None) -> None:
    """key/value: [T, Hkv, D]; caches: [num_blocks, block_size, Hkv, D]; slot_mapping: [T] int64, -1 = skip."""
    num_blocks, block_size = k_cache.shape[:2]
    flat_k = raw_bytes(k_cache).view(num_blocks * block_size, *k_cache.shape[2:])
    flat_v = raw_bytes(v_cache).view(num_blocks * block_size, *v_cache.shape[2:])
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        slot_mapping, key, value = slot_mapping[valid], key[valid], value[valid]
    flat_k.index_copy_(0, slot_mapping, to_cache_ref(key, k_cache, k_scale))
    flat_v.index_copy_(0, slot_mapping, to_cache_ref(value, v_cache, v_scale))


@triton.jit
def _write_kv_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr, k_scale_ptr, v_scale_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, KV_FP8: tl.constexpr,
):
    """Grid: (T,). One program copies all kv heads of one token (Hkv * D elements, a few KB)."""
    token = tl.program_id(0).to(tl.int64)
    # -1 marks padding (CUDA-graph batches, skipped tokens): decided on the device, no host sync
    # and no boolean-mask compaction as in the reference.
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    block = slot // PAGE_SIZE
    offset = slot % PAGE_SIZE
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < NUM_HEADS) & (offs_d[None, :] < HEAD_DIM)

    k = tl.load(key_ptr + token * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    k_dst = k_cache_ptr + block * stride_kcb + offset * stride_kcs + offs_h[:, None] * stride_kch + offs_d[None, :]
    k_scale = 1.0
    if KV_FP8:
        k_scale = tl.load(k_scale_ptr).to(tl.float32)
    tl.store(k_dst, to_cache_dtype(k, k_scale, k_cache_ptr.dtype.element_ty, KV_FP8), mask=mask)

    v = tl.load(value_ptr + token * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    v_dst = v_cache_ptr + block * stride_vcb + offset * stride_vcs + offs_h[:, None] * stride_vch + offs_d[None, :]
    v_scale = 1.0
    if KV_FP8:
        v_scale = tl.load(v_scale_ptr).to(tl.float32)
    tl.store(v_dst, to_cache_dtype(v, v_scale, v_cache_ptr.dtype.element_ty, KV_FP8), mask=mask)


def write_kv_triton(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor, k_scale: Optional[torch.Tensor] = None,
                    v_scale: Optional[torch.Tensor] = None) -> None:
    """Same contract as write_kv_ref. key/value may be strided views (e.g. slices of a fused qkv
    projection); only their last dim must be contiguous (otherwise they are copied)."""
    num_tokens, num_heads, head_dim = key.shape
    if k_cache.shape[2:] != (num_heads, head_dim) or v_cache.shape != k_cache.shape or value.shape != key.shape:
        raise ValueError(f"write_kv shapes: key {tuple(key.shape)} value {tuple(value.shape)} "
                         f"k_cache {tuple(k_cache.shape)} v_cache {tuple(v_cache.shape)}")
    if num_tokens == 0:
        return
    if key.stride(-1) != 1:
        key = key.contiguous()
    if value.stride(-1) != 1:
        value = value.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("KV caches must be contiguous in the head dimension")
    slot_mapping = slot_mapping.contiguous()
    k_scale, v_scale = kv_scales_or_ones(k_cache, k_scale, v_scale)
    block_h, block_d = next_pow2(num_heads), next_pow2(head_dim)
    _write_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_HEADS=num_heads, HEAD_DIM=head_dim, PAGE_SIZE=k_cache.shape[1], BLOCK_H=block_h, BLOCK_D=block_d,
        KV_FP8=is_fp8(k_cache),
        num_warps=4 if block_h * block_d >= 1024 else 1,
    )


def write_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, k_scale: Optional[torch.Tensor] = None,
             v_scale: Optional[torch.Tensor] = None) -> None:
    if triton_enabled_for(key):
        write_kv_triton(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    else:
        write_kv_ref(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)
