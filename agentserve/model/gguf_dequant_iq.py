"""The IQ ("importance") GGUF types dequantized with torch: IQ4_NL, IQ4_XS, IQ3_XXS, IQ3_S, IQ2_XXS,
IQ2_XS, IQ2_S, IQ1_S and IQ1_M, for model/gguf_dequant.py. The lattice grids and sign tables are the
gguf library's own (its `init_grid()` decodes them); the formulas are its numpy ones op for op in fp32,
so the values are bit-identical (tests/test_gguf_dequant.py). The library's numpy code runs these at
~40-110M parameters/s on a CPU core: minutes for the 70B files these low-bit types are made for."""

from __future__ import annotations

import functools
from typing import Callable

import torch
from gguf import GGMLQuantizationType, quants

from agentserve.model.gguf_blocks import QK_K, bits, f16, little_endian, nibbles


_GRID_TYPES = {GGMLQuantizationType.IQ2_XXS: quants.IQ2_XXS, GGMLQuantizationType.IQ2_XS: quants.IQ2_XS,
               GGMLQuantizationType.IQ2_S: quants.IQ2_S, GGMLQuantizationType.IQ3_XXS: quants.IQ3_XXS,
               GGMLQuantizationType.IQ3_S: quants.IQ3_S, GGMLQuantizationType.IQ1_S: quants.IQ1_S,
               GGMLQuantizationType.IQ1_M: quants.IQ1_M}


@functools.lru_cache(maxsize=None)
def _grid(qtype: GGMLQuantizationType, device: torch.device) -> torch.Tensor:
    """The type's lattice points as a [points, values] fp32 table on `device`."""
    cls = _GRID_TYPES[qtype]
    cls.init_grid()
    assert cls.grid is not None
    return torch.from_numpy(cls.grid.reshape(cls.grid_shape).copy()).to(device)


@functools.lru_cache(maxsize=None)
def _sign_table(device: torch.device) -> torch.Tensor:
    """IQ2_XXS's `ksigns`: 7 sign bits -> the 8-bit sign mask with even parity."""
    return torch.frombuffer(bytearray(quants.IQ2_XXS.ksigns), dtype=torch.uint8).to(device)


@functools.lru_cache(maxsize=None)
def _kvalues(device: torch.device) -> torch.Tensor:
    """IQ4_NL's 16 non-linear levels."""
    return torch.tensor(quants.IQ4_NL.kvalues, dtype=torch.int8, device=device)


def _signs(mask: torch.Tensor) -> torch.Tensor:
    """8-bit sign masks (..., ) -> (..., 8) of +1.0 / -1.0 (bit i set: value i negative)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=mask.device)
    return torch.where(((mask.unsqueeze(-1) >> shifts) & 1) == 0, 1.0, -1.0)


def _xxs_scales_and_signs(d: torch.Tensor, aux: torch.Tensor, factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """IQ2_XXS / IQ3_XXS: each 32-bit word holds four 7-bit sign indices and a 4-bit scale on top."""
    n = aux.shape[0]
    db = (d * (0.5 + (aux >> 28).to(torch.float32)) * factor).reshape(n, -1, 1, 1)
    index = (aux.unsqueeze(-1) >> torch.tensor([0, 7, 14, 21], device=aux.device)) & 0x7F
    return db, _signs(_sign_table(aux.device)[index])


def _iq2_xxs(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    words = b[:, 2:].reshape(n, 8, 8)  # per 32 weights: 4 grid indices, then the scale / signs word
    db, signs = _xxs_scales_and_signs(f16(b[:, :2]), little_endian(words[:, :, 4:]).reshape(n, 8), 0.25)
    grid = _grid(GGMLQuantizationType.IQ2_XXS, b.device)[words[:, :, :4].long()]
    return (db * grid * signs).reshape(n, QK_K)


def _iq2_xs(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    qs = little_endian(b[:, 2:66].reshape(n, 32, 2))
    scales = nibbles(b[:, 66:74].reshape(n, 8, 1), 8).reshape(n, 16)
    db = (f16(b[:, :2]) * (0.5 + scales.to(torch.float32)) * 0.25).reshape(n, 16, 1, 1)
    signs = _signs(_sign_table(b.device)[qs >> 9]).reshape(n, 16, 2, 8)
    grid = _grid(GGMLQuantizationType.IQ2_XS, b.device)[qs & 511].reshape(n, 16, 2, 8)
    return (db * grid * signs).reshape(n, QK_K)


def _iq2_s(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    qs, sign_bits, qh, packed = b[:, 2:34], b[:, 34:66], b[:, 66:74], b[:, 74:82]
    scales = nibbles(packed.reshape(n, 8, 1), 8).reshape(n, 16)
    db = (f16(b[:, :2]) * (0.5 + scales.to(torch.float32)) * 0.25).reshape(n, 16, 1, 1)
    signs = _signs(sign_bits).reshape(n, 16, 2, 8)
    high = bits(qh, 2, 4).transpose(1, 2).reshape(n, 32)
    index = qs.long() | (high.long() << 8)
    grid = _grid(GGMLQuantizationType.IQ2_S, b.device)[index].reshape(n, 16, 2, 8)
    return (db * grid * signs).reshape(n, QK_K)


def _iq3_xxs(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    db, signs = _xxs_scales_and_signs(f16(b[:, :2]), little_endian(b[:, 66:98].reshape(n, 8, 4)), 0.5)
    grid = _grid(GGMLQuantizationType.IQ3_XXS, b.device)[b[:, 2:66].long()].reshape(n, 8, 4, 8)
    return (db * grid * signs).reshape(n, QK_K)


def _iq3_s(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    qs, qh, sign_bits, packed = b[:, 2:66], b[:, 66:74], b[:, 74:106], b[:, 106:110]
    scales = nibbles(packed.reshape(n, 4, 1), 4).reshape(n, 8)
    db = (f16(b[:, :2]) * (1 + 2 * scales).to(torch.float32)).reshape(n, 8, 1, 1)
    signs = _signs(sign_bits).reshape(n, 8, 4, 8)
    high = bits(qh, 1, 8).transpose(1, 2).reshape(n, 64)
    index = qs.long() | (high.long() << 8)
    grid = _grid(GGMLQuantizationType.IQ3_S, b.device)[index].reshape(n, 8, 4, 8)
    return (db * grid * signs).reshape(n, QK_K)


_IQ1_DELTA = float(quants.IQ1_S.delta)


def _iq1_s(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    qs, qh = b[:, 2:34], little_endian(b[:, 34:50].reshape(n, 8, 2))
    dl = (f16(b[:, :2]) * (2 * ((qh >> 12) & 7) + 1).to(torch.float32)).reshape(n, 8, 1, 1)
    delta = torch.where((qh & 0x8000) == 0, _IQ1_DELTA, -_IQ1_DELTA).to(torch.float32).reshape(n, 8, 1, 1)
    high = (qh.unsqueeze(-1) >> torch.tensor([0, 3, 6, 9], device=b.device)) & 7
    index = qs.long() | (high << 8).reshape(n, 32)
    grid = _grid(GGMLQuantizationType.IQ1_S, b.device)[index].reshape(n, 8, 4, 8)
    return (dl * (grid + delta)).reshape(n, QK_K)


def _iq1_m(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    qs, qh, packed = b[:, :32], b[:, 32:48], little_endian(b[:, 48:56].reshape(n, 4, 2))
    # The block's fp16 scale is spread over the top nibbles of the four 16-bit scale words.
    top = (packed & 0xF000) >> torch.tensor([12, 8, 4, 0], device=b.device)
    d_bits = top[:, 0] | top[:, 1] | top[:, 2] | top[:, 3]
    d = f16(torch.stack([d_bits & 0xFF, d_bits >> 8], dim=1).to(torch.uint8))
    scales = ((packed.unsqueeze(-1) >> torch.tensor([0, 3, 6, 9], device=b.device)) & 7).reshape(n, 16)
    dl = (d * (2 * scales + 1).to(torch.float32)).reshape(n, 8, 2, 1, 1)
    halves = qh.unsqueeze(-1) >> torch.tensor([0, 4], dtype=torch.uint8, device=b.device)  # (n, 16, 2)
    index = qs.long() | ((halves & 7).long() << 8).reshape(n, 32)
    delta = torch.where((halves & 8) == 0, _IQ1_DELTA, -_IQ1_DELTA).to(torch.float32).reshape(n, 8, 2, 2, 1)
    grid = _grid(GGMLQuantizationType.IQ1_M, b.device)[index].reshape(n, 8, 2, 2, 8)
    return (dl * (grid + delta)).reshape(n, QK_K)


def _iq4_nl(b: torch.Tensor) -> torch.Tensor:
    q = nibbles(b[:, 2:], 1).reshape(b.shape[0], 32)
    return f16(b[:, :2]) * _kvalues(b.device)[q.long()].to(torch.float32)


def _iq4_xs(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    high_word = little_endian(b[:, 2:4].reshape(n, 1, 2))  # (n, 1): eight 2-bit scale tops
    low = nibbles(b[:, 4:8].reshape(n, 4, 1), 4).reshape(n, 8)
    high = (high_word >> torch.arange(0, 16, 2, device=b.device)) & 3
    scales = ((low.long() | (high << 4)) - 32).to(torch.float32)
    dl = (f16(b[:, :2]) * scales).reshape(n, 8, 1)
    q = nibbles(b[:, 8:], 8).reshape(n, 8, 32)
    return (dl * _kvalues(b.device)[q.long()].to(torch.float32)).reshape(n, QK_K)


IQ_BLOCK_DEQUANTIZERS: dict[GGMLQuantizationType, Callable[[torch.Tensor], torch.Tensor]] = {
    GGMLQuantizationType.IQ4_NL: _iq4_nl, GGMLQuantizationType.IQ4_XS: _iq4_xs,
    GGMLQuantizationType.IQ3_XXS: _iq3_xxs, GGMLQuantizationType.IQ3_S: _iq3_s,
    GGMLQuantizationType.IQ2_XXS: _iq2_xxs, GGMLQuantizationType.IQ2_XS: _iq2_xs,
    GGMLQuantizationType.IQ2_S: _iq2_s, GGMLQuantizationType.IQ1_S: _iq1_s, GGMLQuantizationType.IQ1_M: _iq1_m,
}
