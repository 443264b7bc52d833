"""Unpacking llama.cpp's quantized blocks with torch: the bit-level helpers the GGUF dequantizers
share (model/gguf_dequant.py, model/gguf_dequant_iq.py). Each takes uint8 byte columns of a batch of
blocks, one block per row."""

from __future__ import annotations

import torch

QK_K = 256  # weights per K-quant (and IQ) super-block


def f16(raw: torch.Tensor) -> torch.Tensor:
    """Little-endian fp16 stored in the byte columns `raw` (n, 2k) -> fp32 (n, k): a block's scale, or an F16
    tensor's values."""
    return raw.contiguous().view(torch.float16).to(torch.float32)


def little_endian(raw: torch.Tensor) -> torch.Tensor:
    """Unsigned little-endian integers of the last dimension's bytes (..., k) -> int64 (...)."""
    value = torch.zeros(raw.shape[:-1], dtype=torch.int64, device=raw.device)
    for i in range(raw.shape[-1]):
        value |= raw[..., i].long() << (8 * i)
    return value


def nibbles(qs: torch.Tensor, groups: int) -> torch.Tensor:
    """(n, groups * L) bytes -> (n, groups, 2, L): each group's low nibbles, then its high nibbles."""
    q = qs.reshape(qs.shape[0], groups, 1, -1)
    return torch.cat([q & 0x0F, q >> 4], dim=2)


def bits(raw: torch.Tensor, width: int, count: int) -> torch.Tensor:
    """(n, B) bytes -> (n, count, B): field i holds bits [width*i, width*(i+1)) of every byte."""
    shifts = torch.arange(0, width * count, width, dtype=torch.uint8, device=raw.device).reshape(1, count, 1)
    return (raw.unsqueeze(1) >> shifts) & ((1 << width) - 1)
