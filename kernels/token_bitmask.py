"""Grammar token bitmasks applied to logits: disallowed tokens get -inf, in place.

bitmask: int32 [B, ceil(V_mask/32)], rows aligned with the logits rows; bit `i % 32` of word
`i // 32` set = token i allowed (the llguidance/xgrammar/outlines-core layout). `indices`
(LongTensor) limits the work to those rows (the constrained ones); without it every row is
masked. Logit columns past the bitmask's 32*words are disallowed (model vocab padding), bits past
the logits' width are ignored.
"""

from __future__ import annotations

from typing import Optional

import torch

try:  # shared Triton plumbing (optional import, backend choice)
    from ._triton_utils import HAS_TRITON, tl, triton, triton_enabled_for
except ImportError:  # pragma: no cover - standalone use
    try:
        import triton
        import triton.language as tl

        HAS_TRITON = True
    except ImportError:
        HAS_TRITON = False
        triton = None  # type: ignore[assignment]
        tl = None  # type: ignore[assignment]

    def triton_enabled_for(t: torch.Tensor) -> bool:
        return HAS_TRITON and t.is_cuda


def _check(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
    if bitmask.dim() != 2 or bitmask.dtype != torch.int32:
        raise ValueError("bitmask must be a 2-D int32 tensor [batch, ceil(vocab/32)]")
    if bitmask.shape[0] != logits.shape[0]:
        raise ValueError(f"bitmask has {bitmask.shape[0]} rows, logits {logits.shape[0]}")


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """bool [rows, vocab_size]: True = allowed (columns past the mask are False)."""
    rows, words = bitmask.shape
    shifts = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    bits = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().reshape(rows, words * 32)
    if vocab_size <= words * 32:
        return bits[:, :vocab_size]
    pad = torch.zeros((rows, vocab_size - words * 32), dtype=torch.bool, device=bitmask.device)
    return torch.cat([bits, pad], dim=1)


def apply_token_bitmask_ref(logits: torch.Tensor, bitmask: torch.Tensor,
                            indices: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Torch reference: logits[r, t] = -inf where token t is not allowed in row r (in place)."""
    _check(logits, bitmask)
    if bitmask.device != logits.device:
        bitmask = bitmask.to(logits.device, non_blocking=True)
    if indices is None:
        allowed = unpack_bitmask(bitmask, logits.shape[1])
        logits.masked_fill_(~allowed, float("-inf"))
        return logits
    indices = indices.to(device=logits.device, dtype=torch.long)
    if indices.numel() == 0:
        return logits
    allowed = unpack_bitmask(bitmask.index_select(0, indices), logits.shape[1])
    rows = logits.index_select(0, indices).masked_fill(~allowed, float("-inf"))
    logits.index_copy_(0, indices, rows)
    return logits


if HAS_TRITON:

    @triton.jit
    def _apply_token_bitmask_kernel(
        logits_ptr,
        bitmask_ptr,
        indices_ptr,
        vocab_size,
        num_words,
        logits_stride,
        bitmask_stride,
        HAS_INDICES: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        pid_row = tl.program_id(0)
        pid_col = tl.program_id(1)
        if HAS_INDICES:
            row = tl.load(indices_ptr + pid_row).to(tl.int64)
        else:
            row = pid_row.to(tl.int64)
        offs = pid_col * BLOCK + tl.arange(0, BLOCK)
        in_vocab = offs < vocab_size
        word_idx = offs // 32
        words = tl.load(bitmask_ptr + row * bitmask_stride + word_idx,
                        mask=in_vocab & (word_idx < num_words), other=0)
        allowed = ((words >> (offs % 32)) & 1) != 0
        neg_inf = tl.full([BLOCK], float("-inf"), dtype=logits_ptr.dtype.element_ty)
        # store only the disallowed entries: no read of the logits at all
        tl.store(logits_ptr + row * logits_stride + offs, neg_inf, mask=in_vocab & ~allowed)


def apply_token_bitmask_triton(logits: torch.Tensor, bitmask: torch.Tensor,
                               indices: Optional[torch.Tensor] = None, block: int = 4096) -> torch.Tensor:
    """The Triton kernel (same semantics as the reference); logits rows must be contiguous."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not available")
    _check(logits, bitmask)
    if logits.stride(1) != 1:
        raise ValueError("logits rows must be contiguous")
    if bitmask.device != logits.device:
        bitmask = bitmask.to(logits.device, non_blocking=True)
    if bitmask.stride(1) != 1:
        bitmask = bitmask.contiguous()
    batch, vocab = logits.shape
    if indices is not None:
        indices = indices.to(device=logits.device, dtype=torch.long)
        rows = indices.numel()
    else:
        rows = batch
    if rows == 0 or vocab == 0:
        return logits
    grid = (rows, triton.cdiv(vocab, block))
    _apply_token_bitmask_kernel[grid](
        logits, bitmask, indices if indices is not None else bitmask, vocab, bitmask.shape[1],
        logits.stride(0), bitmask.stride(0), HAS_INDICES=indices is not None, BLOCK=block)
    return logits


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor,
                        indices: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Dispatch: the Triton kernel for CUDA logits (when Triton is available), else the reference."""
    if triton_enabled_for(logits) and logits.stride(-1) == 1:
        return apply_token_bitmask_triton(logits, bitmask, indices)
    return apply_token_bitmask_ref(logits, bitmask, indices)
