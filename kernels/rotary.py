"""Rotary position embedding (neox / rotate-half layout, as in HF Llama/Qwen/Mistral)."""

from __future__ import annotations

import torch

from ._triton_utils import next_pow2, tl, triton, triton_enabled_for


def apply_rotary_ref(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                     cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, Hq, D], k: [T, Hkv, D], positions: [T], cos_sin_cache: [max_pos, D] fp32 (cos half | sin half).

    Returns rotated copies (the Triton version may rotate in place)."""
    half = cos_sin_cache.shape[-1] // 2
    cs = cos_sin_cache[positions.long()]
    cos = torch.cat([cs[:, :half], cs[:, :half]], dim=-1)[:, None, :]
    sin = torch.cat([cs[:, half:], cs[:, half:]], dim=-1)[:, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        # Computed in the input dtype after casting cos/sin, as HF does, so fp32 matches bit for bit.
        x1, x2 = x[..., :half], x[..., half:]
        rotated = torch.cat([-x2, x1], dim=-1)
        return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)

    return rotate(q), rotate(k)


@triton.jit
def _rotate_heads(src_ptr, dst_ptr, stride_sh, stride_dh, num_heads, cos, sin, offs, d_mask,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    """Rotates the heads of one token: out1 = x1*cos - x2*sin, out2 = x2*cos + x1*sin.

    Each product and the sum are rounded to the tensor dtype, exactly as the reference's separate
    torch ops do (products of two 16-bit floats are exact in fp32, so bf16/fp16 match bit for bit).
    In place is safe: every element is loaded and stored by the same thread (same layout)."""
    offs_h = tl.arange(0, BLOCK_H)
    mask = (offs_h[:, None] < num_heads) & d_mask[None, :]
    src = src_ptr + offs_h[:, None] * stride_sh + offs[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    dt = dst_ptr.dtype.element_ty
    c = cos.to(dt).to(tl.float32)[None, :]
    s = sin.to(dt).to(tl.float32)[None, :]
    out1 = ((x1 * c).to(dt).to(tl.float32) - (x2 * s).to(dt).to(tl.float32)).to(dt)
    out2 = ((x2 * c).to(dt).to(tl.float32) + (x1 * s).to(dt).to(tl.float32)).to(dt)
    dst = dst_ptr + offs_h[:, None] * stride_dh + offs[None, :]
    tl.store(dst, out1, mask=mask)
    tl.store(dst + HALF, out2, mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr, positions_ptr, cos_sin_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_qot, stride_qoh, stride_kot, stride_koh, stride_cs,
    NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
):
    """Grid: (T,). cos/sin of the token's position are read once and shared by all its q and k heads."""
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    offs = tl.arange(0, BLOCK_HALF)
    d_mask = offs < HALF
    cos = tl.load(cos_sin_ptr + pos * stride_cs + offs, mask=d_mask, other=0.0)
    sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + offs, mask=d_mask, other=0.0)
    _rotate_heads(q_ptr + token * stride_qt, q_out_ptr + token * stride_qot, stride_qh, stride_qoh,
                  NUM_Q_HEADS, cos, sin, offs, d_mask, HALF, BLOCK_HQ)
    _rotate_heads(k_ptr + token * stride_kt, k_out_ptr + token * stride_kot, stride_kh, stride_koh,
                  NUM_KV_HEADS, cos, sin, offs, d_mask, HALF, BLOCK_HK)


def apply_rotary_triton(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                        inplace: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as apply_rotary_ref. By default rotates q and k in place (they are usually
    views into the fused qkv projection output, so this saves two allocations and a copy) and
    returns them; inplace=False writes fresh tensors and leaves the inputs untouched."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if cos_sin_cache.shape[-1] != head_dim or k.shape[2] != head_dim or head_dim % 2:
        raise ValueError(f"rotary shapes: q {tuple(q.shape)} k {tuple(k.shape)} cache {tuple(cos_sin_cache.shape)}")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    cos_sin_cache = cos_sin_cache.contiguous()
    q_out = q if inplace else torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = k if inplace else torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if num_tokens == 0:
        return q_out, k_out
    half = head_dim // 2
    block_hq = next_pow2(num_q_heads)
    _rotary_kernel[(num_tokens,)](
        q, k, q_out, k_out, positions.contiguous(), cos_sin_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1), cos_sin_cache.stride(0),
        NUM_Q_HEADS=num_q_heads, NUM_KV_HEADS=num_kv_heads, HALF=half, BLOCK_HALF=next_pow2(half),
        BLOCK_HQ=block_hq, BLOCK_HK=next_pow2(num_kv_heads),
        num_warps=4 if block_hq * half >= 1024 else 1,
    )
    return q_out, k_out


def apply_rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                 cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatcher. On CUDA the rotation happens in place in q and k (the callers use the returned
    tensors); on CPU the reference returns copies."""
    if triton_enabled_for(q):
        return apply_rotary_triton(q, k, positions, cos_sin_cache, inplace=True)
    return apply_rotary_ref(q, k, positions, cos_sin_cache)
