"""GGUF tensor types dequantized with torch, on the device the model is loaded onto.

The gguf library's numpy dequantization runs on one CPU core at ~40-350M parameters/s by type (an 8B
Q4_K_M file spent ~50 s in it before the first request; benchmarks/gguf_load.py). These are the same
formulas, op for op in the same order and in fp32 (so the values are bit-identical:
tests/test_gguf_dequant.py), applied to the raw blocks on the device the model is loaded onto: on a GPU
the file's bytes cross PCIe at 2-8 bits per weight and the unpacking runs at memory speed; on a CPU
torch's threads share the work (numpy's run on one core). The types here
are the ones GGUF repositories publish: F16, BF16, Q4_0 ... Q8_0, Q2_K ... Q6_K, and the IQ types
(model/gguf_dequant_iq.py); the rest (TQ1_0, TQ2_0, MXFP4, NVFP4) return None and the caller falls
back to the gguf library.

Layouts are llama.cpp's block structs (ggml-common.h): each row of `blocks` is one block of
`type_size` bytes holding `block_size` weights.
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from agentserve.model.gguf_blocks import QK_K, bits, f16, nibbles
from agentserve.model.gguf_dequant_iq import IQ_BLOCK_DEQUANTIZERS


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    d = f16(b[:, :2])
    q = nibbles(b[:, 2:], 1).reshape(b.shape[0], -1).to(torch.int8) - 8
    return d * q.to(torch.float32)


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    d, m = f16(b[:, :2]), f16(b[:, 2:4])
    q = nibbles(b[:, 4:], 1).reshape(b.shape[0], -1).to(torch.float32)
    return d * q + m


def _q5_high(qh: torch.Tensor) -> torch.Tensor:
    """The fifth bits: bit i of the little-endian uint32 `qh` (n, 4 bytes) belongs to weight i."""
    return bits(qh, 1, 8).transpose(1, 2).reshape(qh.shape[0], 32)


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    d = f16(b[:, :2])
    low = nibbles(b[:, 6:], 1).reshape(b.shape[0], -1)
    q = (low | (_q5_high(b[:, 2:6]) << 4)).to(torch.int8) - 16
    return d * q.to(torch.float32)


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    d, m = f16(b[:, :2]), f16(b[:, 2:4])
    low = nibbles(b[:, 8:], 1).reshape(b.shape[0], -1)
    q = (low | (_q5_high(b[:, 4:8]) << 4)).to(torch.float32)
    return d * q + m


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    d = f16(b[:, :2])
    return b[:, 2:].contiguous().view(torch.int8).to(torch.float32) * d


def _q2_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scales, qs = b[:, :16], b[:, 16:80]
    d, dmin = f16(b[:, 80:82]), f16(b[:, 82:84])
    dl = (d * (scales & 0x0F).to(torch.float32)).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).to(torch.float32)).reshape(n, 16, 1)
    # (n, 2 halves, 4 shifts, 32 bytes): 128 bytes' 2-bit fields, shift-major within each half.
    q = bits(qs.reshape(n * 2, 32), 2, 4).reshape(n, 16, 16).to(torch.float32)
    return (dl * q - ml).reshape(n, QK_K)


def _q3_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    hmask, qs, packed, d = b[:, :32], b[:, 32:96], b[:, 96:108], f16(b[:, 108:110])
    low = bits(packed[:, :8], 4, 2).reshape(n, 16)  # scales' low 4 bits
    high = bits(packed[:, 8:], 2, 4).reshape(n, 16)  # their high 2 bits
    scales = ((low | (high << 4)).to(torch.int8) - 32).to(torch.float32)
    dl = (d * scales).reshape(n, 16, 1)
    ql = bits(qs.reshape(n * 2, 32), 2, 4).reshape(n, 16, 16)
    qh = bits(hmask, 1, 8).reshape(n, 16, 16) ^ 1  # a set bit means no -4 offset
    q = (ql.to(torch.int8) - (qh << 2).to(torch.int8)).to(torch.float32)
    return (dl * q).reshape(n, QK_K)


def _k_scales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: each 32-weight sub-block's scale and min, (n, 8, 1) each, from the super-block's fp16
    d and dmin and eight 6-bit scales and eight 6-bit mins packed into bytes 4-15."""
    n = b.shape[0]
    d, dmin = f16(b[:, :2]), f16(b[:, 2:4])
    lo, mid, hi = b[:, 4:8], b[:, 8:12], b[:, 12:16]
    sc = torch.cat([lo & 0x3F, (hi & 0x0F) | ((lo >> 2) & 0x30)], dim=-1)
    mn = torch.cat([mid & 0x3F, (hi >> 4) | ((mid >> 2) & 0x30)], dim=-1)
    return (d * sc.to(torch.float32)).reshape(n, 8, 1), (dmin * mn.to(torch.float32)).reshape(n, 8, 1)


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    dl, ml = _k_scales(b)
    q = nibbles(b[:, 16:], 4).reshape(b.shape[0], 8, 32).to(torch.float32)
    return (dl * q - ml).reshape(b.shape[0], QK_K)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    dl, ml = _k_scales(b)
    low = nibbles(b[:, 48:], 4).reshape(n, 8, 32)
    high = bits(b[:, 16:48], 1, 8).reshape(n, 8, 32)
    q = (low | (high << 4)).to(torch.float32)
    return (dl * q - ml).reshape(n, QK_K)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql_raw, qh_raw = b[:, :128], b[:, 128:192]
    scales = b[:, 192:208].contiguous().view(torch.int8).to(torch.float32)
    d = (f16(b[:, 208:210]) * scales).reshape(n, 16, 1)
    ql = nibbles(ql_raw, 2).reshape(n, 8, 32)
    qh = bits(qh_raw.reshape(n * 2, 32), 2, 4).reshape(n, 8, 32)
    q = ((ql | (qh << 4)).to(torch.int8) - 32).reshape(n, 16, 16).to(torch.float32)
    return (d * q).reshape(n, QK_K)


def _bf16_blocks(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.bfloat16).to(torch.float32)


_BLOCK_DEQUANTIZERS: dict[GGMLQuantizationType, Callable[[torch.Tensor], torch.Tensor]] = {
    GGMLQuantizationType.F16: f16, GGMLQuantizationType.BF16: _bf16_blocks,
    GGMLQuantizationType.Q4_0: _q4_0, GGMLQuantizationType.Q4_1: _q4_1,
    GGMLQuantizationType.Q5_0: _q5_0, GGMLQuantizationType.Q5_1: _q5_1, GGMLQuantizationType.Q8_0: _q8_0,
    GGMLQuantizationType.Q2_K: _q2_k, GGMLQuantizationType.Q3_K: _q3_k, GGMLQuantizationType.Q4_K: _q4_k,
    GGMLQuantizationType.Q5_K: _q5_k, GGMLQuantizationType.Q6_K: _q6_k,
    **IQ_BLOCK_DEQUANTIZERS,
}
TORCH_DEQUANTIZED_TYPES = frozenset(_BLOCK_DEQUANTIZERS) | {GGMLQuantizationType.F32}

# Blocks per call: bounds the int/fp32 intermediates (~10 per weight) on the device.
_BLOCKS_PER_CHUNK = 1 << 16


def dequantize_on(data: np.ndarray, qtype: GGMLQuantizationType, device: torch.device) -> Optional[torch.Tensor]:
    """The tensor's weights as a flat fp32 tensor on `device`, or None for a type not ported here.
    `data` is the tensor's bytes as the file holds them (any numpy view of them)."""
    raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    if qtype == GGMLQuantizationType.F32:
        return torch.from_numpy(raw.copy()).to(device).view(torch.float32)
    dequantize_blocks = _BLOCK_DEQUANTIZERS.get(qtype)
    if dequantize_blocks is None:
        return None
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    blocks = raw.reshape(-1, type_size)
    out = torch.empty(blocks.shape[0] * block_size, dtype=torch.float32, device=device)
    for start in range(0, blocks.shape[0], _BLOCKS_PER_CHUNK):
        with warnings.catch_warnings():
            # A memory-mapped file's blocks are read-only; they are only read, into the device copy.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            host = torch.from_numpy(blocks[start:start + _BLOCKS_PER_CHUNK])
        chunk = host.to(device)
        out[start * block_size:(start + chunk.shape[0]) * block_size] = dequantize_blocks(chunk).reshape(-1)
    return out
