"""Multi-LoRA for decode-sized steps in ONE launch per projection: shrink and expand fused.

Why
---
At one stream a rank-16 q/k/v/o adapter is 27 MB against 15 GB of base weights, yet it cost the
H200 0.52 ms a step (216.4 -> 194.7 tok/s, issue #13): kernels/lora.py runs a shrink and an expand
kernel per adapted projection (2 x (qkv, o) x 32 layers = 128 tiny kernels in the decode CUDA
graph), and each costs a graph node's launch gap and ramp (~3.5-4 us), not its bytes. This kernel
does both halves in one launch, so a decode step runs half as many LoRA kernels.

How
---
Same tile map (kernels/lora.py: `build_lora_batch_meta`), same weight layout (A [max_loras,
num_slices, max_rank, in], B [max_loras, max_rank, out] with the slices concatenated), grid
(tiles, cdiv(out_features, BLOCK_N)) as expand's. Each program, for its BLOCK_M rows and for each
slice its column tile touches:
  h_s = x[rows] @ A[slot, s, :rank]^T   over the full K (A rows past the rank are never loaded),
  acc += (scale_s * h_s) @ B[slot, :rank, its columns of slice s],
then y[rows, columns] += acc. Nothing goes through memory between the halves (no fp32 partial
buffer, no second launch), and each (row, column) of y has exactly one writer: no atomics, and the
result is deterministic.

The price is the recompute: every column tile of a slice computes the same h_s, so each program
reads rank x K of A per slice it touches (rank 16, K 4096, bf16: 128 KB). A is small (one adapter's
qkv A is 384 KB), so after the first program it comes from L2, but the re-reads grow with the
number of tiles x column tiles; hence the fused path only for steps of at most FUSED_MAX_TOKENS
tokens, where the tile count is small (see there). Larger steps keep the two-kernel path, whose
split-K shrink reads each A row once.

Switch
------
AGENTSERVE_LORA_FUSED=1 (or on/true) turns the fused path on for steps of <= FUSED_MAX_TOKENS tokens,
0 (or off/false, the default) keeps the two-kernel path everywhere; read once at import, and
`set_lora_fused` changes it at run time (benchmarks/lora.py --lora-fused on|off, tests). Default off
until benchmarks/lora.py on an H200 shows the one-stream gain (the prediction: benchmarks/NOTES.md,
"Multi-LoRA (issue #13)"). The dispatcher is kernels/lora.py's `add_lora`.

CUDA graphs: launch parameters come from static shapes only (M, the weight shapes, the tile map's
length), the tile map is built on the device, and nothing syncs with the host or allocates: the
kernel is captured and replayed exactly like the two-kernel path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from ._triton_utils import cdiv, dot_modes, next_pow2, tl, triton
from .lora_slices import add_to_rows, any_slice_in_tile, expand_slice, shrink_tile, slice_in_tile, tile_rows

if TYPE_CHECKING:  # only a type here: kernels/lora.py imports this module to dispatch
    from .lora import LoRABatchMeta

MIN_DOT_BLOCK = 16  # tl.dot needs every tile dimension >= 16 (kernels/lora.py: MIN_BLOCK)

# Largest step (tokens) that takes the fused kernel when the switch is on. The bound comes from the
# recompute: a step has one program per (used tile, column tile), and each re-reads rank x K of A from
# L2. At decode sizes (BLOCK_M 16) a used tile is one adapter's tokens, so M tokens make at most M
# used tiles. At M = 8 with every token on its own rank-16 adapter, qkv (48 column tiles of 128)
# re-reads 8 x 48 x 128 KB = 50 MB of L2, ~4-5 us on an H200: about the one launch (~3.5-4 us in a
# graph) the fusion saves, i.e. break-even in the worst case; with fewer adapters than tokens it wins
# (one stream: one tile, 6 MB, under 1 us). At M = 16 the worst case (100 MB) would lose ~5 us.
FUSED_MAX_TOKENS = 8

_ON_VALUES = ("1", "on", "true")
_OFF_VALUES = ("", "0", "off", "false")


def parse_lora_fused_switch(value: Optional[str]) -> bool:
    """AGENTSERVE_LORA_FUSED's value -> on/off. An unknown value is an error, not a silent "off":
    an A/B run that meant "on" must not quietly measure the other path."""
    text = (value or "").strip().lower()
    if text in _ON_VALUES:
        return True
    if text in _OFF_VALUES:
        return False
    raise ValueError(f"AGENTSERVE_LORA_FUSED={value!r}: expected 1/on/true or 0/off/false")


_fused_enabled: bool = parse_lora_fused_switch(os.environ.get("AGENTSERVE_LORA_FUSED"))


def set_lora_fused(enabled: bool) -> None:
    """Turns the fused decode path on or off for every later `add_lora` call (a captured CUDA graph
    keeps the kernels it was captured with)."""
    global _fused_enabled
    _fused_enabled = bool(enabled)


def lora_fused_enabled() -> bool:
    return _fused_enabled


def use_fused_lora(num_tokens: int) -> bool:
    """Whether a step of `num_tokens` tokens takes the fused kernel (a Python check on a static size:
    safe inside CUDA graph capture, where each captured batch size decides once)."""
    return _fused_enabled and num_tokens <= FUSED_MAX_TOKENS


@dataclass(frozen=True)
class LoRAFusedConfig:
    block_n: int = 128
    block_k: int = 256
    num_warps: int = 4
    num_stages: int = 3


def lora_fused_config(in_features: int, out_features: int) -> LoRAFusedConfig:
    """Tiles from static shapes. BLOCK_N 128: a program's time is its K loop over A (the same for any
    BLOCK_N), so wider column tiles mean fewer programs re-reading A (qkv 6144: 48, o 4096: 32,
    fewer than the SMs: one wave) while the B tile stays small (64 x 128 bf16 at rank 64). BLOCK_K
    256 as the shrink's: 16 iterations over K 4096, 3 stages in flight to cover L2 latency."""
    block_k = min(256, max(MIN_DOT_BLOCK, next_pow2(in_features)))
    block_n = min(128, max(MIN_DOT_BLOCK, next_pow2(out_features)))
    return LoRAFusedConfig(block_n=block_n, block_k=block_k)


@triton.jit
def _lora_fused_kernel(
    x_ptr, a_ptr, b_ptr, y_ptr, sorted_ids_ptr, block_slot_ptr, block_start_ptr, block_end_ptr,
    ranks_ptr, scaling_ptr, slice_starts_ptr, K, N,
    stride_xm, stride_a_lora, stride_a_slice, stride_a_rank, stride_b_lora, stride_b_rank, stride_ym,
    stride_rank_lora, stride_scale_lora,
    NUM_SLICES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Grid: (max_blocks, cdiv(N, BLOCK_N)). y[rows, cols] += sum over the slices s these columns
    touch of (scale_s * x[rows] @ A_s^T) @ B_s[:, cols] (module docstring)."""
    tile = tl.program_id(0)
    nt = tl.program_id(1)
    slot = tl.load(block_slot_ptr + tile)
    if slot < 0:
        return  # an unused tile: base rows and empty slots make none
    n_lo = nt * BLOCK_N
    if not any_slice_in_tile(slice_starts_ptr, ranks_ptr, slot, stride_rank_lora, n_lo, NUM_SLICES, BLOCK_N):
        return  # no targeted slice in these columns: y stays as the base layer wrote it
    rows, m_mask = tile_rows(sorted_ids_ptr, block_start_ptr, block_end_ptr, tile, BLOCK_M)
    offs_n = n_lo + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    offs_kk = tl.arange(0, BLOCK_K)
    slot64 = slot.to(tl.int64)
    x_base = x_ptr + rows[:, None] * stride_xm + offs_kk[None, :]
    b_base = b_ptr + slot64 * stride_b_lora + offs_r[:, None] * stride_b_rank + offs_n[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for s in tl.static_range(NUM_SLICES):
        hit, lo, hi, rank = slice_in_tile(slice_starts_ptr, ranks_ptr, slot, s, stride_rank_lora, n_lo, BLOCK_N)
        if hit:
            r_mask = offs_r < rank
            # Shrink, recomputed by every column tile of the slice: h = x[rows] @ A_s[:rank]^T.
            a_ptrs = (a_ptr + slot64 * stride_a_lora + s * stride_a_slice + offs_r[:, None] * stride_a_rank
                      + offs_kk[None, :])
            h = shrink_tile(tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32), x_base, a_ptrs, r_mask, offs_kk, 0, K,
                            BLOCK_K, EVEN_K, UPCAST, DOT_PRECISION)
            acc = expand_slice(acc, h, tl.load(scaling_ptr + slot * stride_scale_lora + s), b_base, r_mask, offs_n,
                               lo, hi, UPCAST, DOT_PRECISION)
    add_to_rows(y_ptr, acc, rows, m_mask, offs_n, N, stride_ym)


def _check_fused_shapes(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                        ranks: torch.Tensor, scaling: torch.Tensor, meta: LoRABatchMeta,
                        slice_starts: torch.Tensor) -> None:
    if lora_a.dim() != 4 or lora_b.dim() != 3 or x.dim() != 2 or y.dim() != 2:
        raise ValueError(f"lora fused: x {tuple(x.shape)} and y {tuple(y.shape)} must be 2-D, A "
                         f"{tuple(lora_a.shape)} [max_loras, num_slices, max_rank, in_features], B "
                         f"{tuple(lora_b.shape)} [max_loras, max_rank, out_features]")
    max_loras, num_slices, max_rank, k = lora_a.shape
    if x.shape[1] != k or lora_b.shape[:2] != (max_loras, max_rank) or y.shape != (x.shape[0], lora_b.shape[2]):
        raise ValueError(f"lora fused: x {tuple(x.shape)}, y {tuple(y.shape)}, A {tuple(lora_a.shape)} and "
                         f"B {tuple(lora_b.shape)} do not fit together")
    if x.shape[0] != meta.num_tokens or max_loras != meta.max_loras:
        raise ValueError(f"lora fused: {x.shape[0]} tokens / {max_loras} slots, but the batch meta was "
                         f"built for {meta.num_tokens} tokens / {meta.max_loras} slots")
    if tuple(ranks.shape) != (max_loras, num_slices) or tuple(scaling.shape) != (max_loras, num_slices):
        raise ValueError(f"lora fused: ranks {tuple(ranks.shape)} and scaling {tuple(scaling.shape)} must be "
                         f"[max_loras, num_slices] = [{max_loras}, {num_slices}]")
    if slice_starts.shape != (num_slices + 1,):
        raise ValueError(f"lora fused: slice_starts {tuple(slice_starts.shape)} must have num_slices + 1 entries")
    if x.stride(1) != 1 or y.stride(1) != 1 or lora_a.stride(3) != 1 or lora_b.stride(2) != 1:
        raise ValueError("lora fused: x, y, A and B rows must be contiguous")


def add_lora_fused(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                   ranks: torch.Tensor, scaling: torch.Tensor, meta: LoRABatchMeta,
                   slice_starts: torch.Tensor, config: Optional[LoRAFusedConfig] = None) -> None:
    """y += the LoRA delta of every adapter token, in place, in one Triton launch (any M works; the
    dispatcher sends only steps of <= FUSED_MAX_TOKENS here). `slice_starts` from slice_starts_for."""
    _check_fused_shapes(y, x, lora_a, lora_b, ranks, scaling, meta, slice_starts)
    max_loras, num_slices, max_rank, k = lora_a.shape
    n = lora_b.shape[2]
    if meta.max_blocks == 0 or n == 0:
        return
    cfg = config or lora_fused_config(k, n)
    upcast, precision = dot_modes(lora_a.dtype)
    _lora_fused_kernel[(meta.max_blocks, cdiv(n, cfg.block_n))](
        x, lora_a, lora_b, y, meta.sorted_token_ids, meta.block_slot, meta.block_row_start, meta.block_row_end,
        ranks, scaling, slice_starts, k, n,
        x.stride(0), lora_a.stride(0), lora_a.stride(1), lora_a.stride(2), lora_b.stride(0), lora_b.stride(1),
        y.stride(0), ranks.stride(0), scaling.stride(0),
        NUM_SLICES=num_slices, BLOCK_M=meta.block_m, BLOCK_N=cfg.block_n,
        BLOCK_R=max(MIN_DOT_BLOCK, next_pow2(max_rank)), BLOCK_K=cfg.block_k, EVEN_K=k % cfg.block_k == 0,
        UPCAST=upcast, DOT_PRECISION=precision, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
