"""Multi-LoRA shrink and expand (Punica / S-LoRA SGMV style): y += scale * (x @ A^T) @ B^T, where
every token picks its adapter through a GPU slot index, one launch per kernel for all adapters.

Batch layout (why a per-token slot index, sorted on the device)
---------------------------------------------------------------
The runner writes one persistent int32 buffer, `token_slots[M]`: each token's GPU slot in
[0, max_loras), or -1 for "base model only". That is the cheapest thing to fill on the host (a
request's slot repeated over its tokens) and the only thing a CUDA graph replay has to update.
`build_lora_batch_meta` then derives, on the device and with shapes that depend only on
(M, max_loras, block_m), everything the kernels need:

- `sorted_token_ids`: token rows grouped by slot (a stable sort; base rows last, in no segment);
- a tile map in the style of fused-MoE's block alignment: the sorted rows of every slot are cut
  into BLOCK_M tiles, and `block_slot[b]` / `block_row_start[b]` / `block_row_end[b]` say which slot
  tile b belongs to and which sorted rows it covers. The grid's first axis is the worst-case tile
  count, cdiv(M, BLOCK_M) + min(max_loras, M); unused tiles have slot -1 and return at once.

So segments are ragged and any mix is fine, base-only rows make no tiles at all (they cost
nothing), and no host sync or data-dependent shape appears anywhere (vLLM's first SGMV path read
segment lengths back with .item(); its v1 kernels grid over max_loras x cdiv(M, BLOCK_M) and exit
early, which launches max_loras times more empty programs than this tile map at prefill sizes).

Weight layout (per layer and fused projection; the manager stacks adapters into it)
-----------------------------------------------------------------------------------
- A: `[max_loras, num_slices, max_rank, in_features]` — PEFT's lora_A.weight ([r, in]) per slice,
  rank rows past the adapter's rank zero-padded. Rank rows are contiguous, so masking r >= rank
  skips whole rows of memory.
- B: `[max_loras, max_rank, out_features]` — PEFT's lora_B.weight ([out_s, r]) transposed, the
  slices concatenated along the output dimension exactly as the fused base weight concatenates
  q|k|v or gate|up (`slice_starts` holds the column boundaries). Transposed so that a rank row is
  contiguous along the output (masked rank rows again skip memory, and the expand tile is a plain
  [rank, n] operand); concatenated so that GQA's small k/v slices pad nothing.
- `ranks[max_loras, num_slices]` int32 and `scaling[max_loras, num_slices]` fp32: per slot and
  slice, because PEFT's rank_pattern / alpha_pattern make both per module, and a rank of 0 marks a
  module the adapter does not target (its programs return before loading anything).

Kernels
-------
- shrink: grid (tiles, SPLIT_K, num_slices). Each program computes a [BLOCK_M, BLOCK_R] tile of
  x @ A_s^T over its share of K (rank-aware: BLOCK_R = the padded max rank, A rows past the slot's
  rank are never loaded). Split-K partials go to their own planes of an fp32 buffer
  `[SPLIT_K, num_slices, M, max_rank]` and are summed by expand, so there are no atomics, no
  memset and the result is deterministic. Decode wants split-K (one token's shrink is a pure read
  of A, too little work for one SM; with many adapters, a K walk of 1-2 chunks per program keeps
  enough loads in flight); prefill has enough tiles and uses SPLIT_K = 1 or 2.
- expand: grid (tiles, cdiv(out_features, BLOCK_N)) over the concatenated output. A column tile may
  straddle two slices; each slice it touches adds dot(scale_s * h_s, B_s tile) for its own columns.
  It reads y, adds, and writes y (each (token, column) has one writer: no atomics). BLOCK_N grows
  from 64 to 256 when the grid has tiles enough (expand_block_n: many adapters in a decode step).
- decode-sized steps, with AGENTSERVE_LORA_FUSED=1: both in one launch (kernels/lora_fused.py).

Both kernels read their launch parameters from shapes only, so they can be captured in CUDA graphs
together with `build_lora_batch_meta` (torch.sort, searchsorted, cumsum: no syncs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ._triton_utils import (
    cdiv, dot_modes, next_pow2, num_sms, pdl_begin, pdl_launch, tl, triton, triton_enabled_for,
)
from .lora_fused import add_lora_fused, use_fused_lora
from .lora_slices import add_to_rows, any_slice_in_tile, expand_dot, shrink_dot, shrink_tile, slice_in_tile, tile_rows

MIN_BLOCK = 16  # tl.dot needs every tile dimension >= 16
MAX_SPLIT_K = 16


@dataclass(frozen=True)
class LoRABatchMeta:
    """Per-step tile map over the tokens (see the module docstring); all int32 device tensors."""

    token_slots: torch.Tensor      # [M] slot per token, -1 = base only (the runner's buffer)
    sorted_token_ids: torch.Tensor  # [M] rows grouped by slot, base rows last
    block_slot: torch.Tensor       # [max_blocks] slot of each tile, -1 = unused tile
    block_row_start: torch.Tensor  # [max_blocks] first position in sorted_token_ids
    block_row_end: torch.Tensor    # [max_blocks] end of the tile's slot segment (exclusive)
    block_m: int
    max_loras: int

    @property
    def num_tokens(self) -> int:
        return self.token_slots.shape[0]

    @property
    def max_blocks(self) -> int:
        return self.block_slot.shape[0]


def default_block_m(num_tokens: int) -> int:
    """16 rows at decode sizes (most segments hold a token or a few); 64 for prefill, where a
    bigger tile reads each A/B tile once per 64 tokens instead of once per 16."""
    return MIN_BLOCK if num_tokens <= 512 else 64


def max_lora_blocks(num_tokens: int, max_loras: int, block_m: int) -> int:
    """Upper bound of the tiles a step can need: every non-empty slot adds at most one partial tile."""
    return cdiv(num_tokens, block_m) + min(max_loras, num_tokens)


def one_token_lora_batch_meta(token_slots: torch.Tensor, max_loras: int, block_m: int) -> LoRABatchMeta:
    """build_lora_batch_meta's result for one token (batch-1 decode) in closed form: tile 0 holds the
    token if its slot is in [0, max_loras), the other tile is unused. ~8 small kernels instead of the
    general path's ~30 (sort, searchsorted, cumsum, gathers): in a batch-1 decode graph with an
    adapter those were the longest run of launches after the projections."""
    num_tiles = max_lora_blocks(1, max_loras, block_m)
    slot = token_slots.to(torch.int32)
    valid = (slot >= 0) & (slot < max_loras)
    unused = num_tiles - 1
    return LoRABatchMeta(
        token_slots=token_slots,
        sorted_token_ids=torch.zeros(1, dtype=torch.int32, device=slot.device),
        block_slot=F.pad(torch.where(valid, slot, -1), (0, unused), value=-1),
        block_row_start=torch.zeros(num_tiles, dtype=torch.int32, device=slot.device),
        block_row_end=F.pad(valid.to(torch.int32), (0, unused)),
        block_m=block_m, max_loras=max_loras)


def build_lora_batch_meta(token_slots: torch.Tensor, max_loras: int,
                          block_m: Optional[int] = None) -> LoRABatchMeta:
    """Tile map for `token_slots` ([M] ints: slot or -1). Device ops only, shapes fixed by
    (M, max_loras, block_m): safe inside CUDA graph capture. Slots outside [0, max_loras) are
    treated as base rows (they cannot be validated without a host sync)."""
    if token_slots.dim() != 1:
        raise ValueError(f"token_slots must be 1-D, got shape {tuple(token_slots.shape)}")
    if max_loras < 1:
        raise ValueError(f"max_loras must be >= 1, got {max_loras}")
    m = token_slots.shape[0]
    bm = block_m if block_m is not None else default_block_m(m)
    if m == 1:
        return one_token_lora_batch_meta(token_slots, max_loras, bm)
    return general_lora_batch_meta(token_slots, max_loras, bm)


def general_lora_batch_meta(token_slots: torch.Tensor, max_loras: int, bm: int) -> LoRABatchMeta:
    """The tile map of any number of tokens, by device ops (counting sort by slot, tiles per slot)."""
    m = token_slots.shape[0]
    dev = token_slots.device
    slots = token_slots.to(torch.int64)
    key = torch.where((slots >= 0) & (slots < max_loras), slots, max_loras)  # base rows sort last
    sorted_key, order = torch.sort(key, stable=True)  # stable: a request's rows stay in order
    # Segment bounds by binary search in the sorted keys (bincount would sync to size its output).
    slot_ids = torch.arange(max_loras, dtype=torch.int64, device=dev)
    seg_start = torch.searchsorted(sorted_key, slot_ids)
    seg_end = torch.searchsorted(sorted_key, slot_ids, right=True)
    counts = seg_end - seg_start
    blocks = (counts + bm - 1) // bm
    block_end = torch.cumsum(blocks, 0)
    block_begin = block_end - blocks
    tile = torch.arange(max_lora_blocks(m, max_loras, bm), dtype=torch.int64, device=dev)
    slot = torch.searchsorted(block_end, tile, right=True)  # first slot whose tiles end after b
    used = slot < max_loras
    slot_c = slot.clamp(max=max_loras - 1)
    row_start = seg_start[slot_c] + (tile - block_begin[slot_c]) * bm
    return LoRABatchMeta(
        token_slots=token_slots,
        sorted_token_ids=order.to(torch.int32),
        block_slot=torch.where(used, slot, -1).to(torch.int32),
        block_row_start=torch.where(used, row_start, 0).to(torch.int32),
        block_row_end=torch.where(used, seg_end[slot_c], 0).to(torch.int32),
        block_m=bm, max_loras=max_loras)


def slice_starts_for(slice_sizes: Sequence[int], device: torch.device) -> torch.Tensor:
    """Column boundaries [0, n0, n0+n1, ...] of the fused output's slices, as the kernels read them.
    The caller keeps it (a module buffer): creating it is a host-to-device copy, not capturable."""
    starts = [0]
    for n in slice_sizes:
        starts.append(starts[-1] + int(n))
    return torch.tensor(starts, dtype=torch.int32, device=device)


# ---------------------------------------------------------------------------------------------
# Torch references (gather + bmm), also the CPU engine's path
# ---------------------------------------------------------------------------------------------


def _gather_slots(token_slots: torch.Tensor, max_loras: int) -> tuple[torch.Tensor, torch.Tensor]:
    slots = token_slots.to(torch.int64)
    active = (slots >= 0) & (slots < max_loras)
    return slots.clamp(0, max_loras - 1), active


def lora_shrink_ref(x: torch.Tensor, lora_a: torch.Tensor, ranks: torch.Tensor,
                    token_slots: torch.Tensor) -> torch.Tensor:
    """h[s, t, r] = x[t] . A[slot_t, s, r] for r < rank[slot_t, s]; 0 for base rows. fp32 [S, M, R]."""
    max_loras, num_slices, max_rank, _ = lora_a.shape
    slot, active = _gather_slots(token_slots, max_loras)
    a = lora_a.float()[slot]                                   # [M, S, R, K]
    h = torch.bmm(a.flatten(1, 2), x.float()[:, :, None])[..., 0].view(-1, num_slices, max_rank)
    keep = torch.arange(max_rank, device=x.device)[None, None, :] < ranks.to(x.device)[slot][:, :, None]
    h = torch.where(keep & active[:, None, None], h, 0.0)  # where, not *: a masked inf must not become NaN
    return h.transpose(0, 1).contiguous()


def lora_expand_ref(y: torch.Tensor, shrunk: torch.Tensor, lora_b: torch.Tensor, ranks: torch.Tensor,
                    scaling: torch.Tensor, token_slots: torch.Tensor, slice_sizes: Sequence[int]) -> None:
    """y[t, slice s] += scale[slot_t, s] * h[s, t, :rank] @ B^T[slot_t, :rank, slice s], in place.
    `shrunk` is [S, M, R] (the reference shrink's output); base rows are left untouched."""
    max_loras, max_rank, _ = lora_b.shape
    slot, active = _gather_slots(token_slots, max_loras)
    keep = torch.arange(max_rank, device=y.device)[None, :] < ranks.to(y.device)[slot][:, :, None]
    delta = torch.zeros(y.shape, dtype=torch.float32, device=y.device)
    lo = 0
    for s, n in enumerate(slice_sizes):
        h = torch.where(keep[:, s], shrunk[s].float(), 0.0) * scaling.to(y.device).float()[slot, s][:, None]  # [M, R]
        b = torch.where(keep[:, s, :, None], lora_b.float()[slot][:, :, lo:lo + n], 0.0)                    # [M, R, n]
        delta[:, lo:lo + n] = torch.bmm(h[:, None, :], b)[:, 0]
        lo += n
    # where(), not y[active] +=: no data-dependent shape, so the torch backend stays capturable
    y.copy_(torch.where(active[:, None], (y.float() + delta).to(y.dtype), y))


def add_lora_ref(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                 ranks: torch.Tensor, scaling: torch.Tensor, token_slots: torch.Tensor,
                 slice_sizes: Sequence[int]) -> None:
    shrunk = lora_shrink_ref(x, lora_a, ranks, token_slots)
    lora_expand_ref(y, shrunk, lora_b, ranks, scaling, token_slots, slice_sizes)


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _lora_shrink_kernel(
    x_ptr, a_ptr, h_ptr, sorted_ids_ptr, block_slot_ptr, block_start_ptr, block_end_ptr, ranks_ptr,
    K, MAX_RANK, stride_xm, stride_a_lora, stride_a_slice, stride_a_rank,
    stride_h_split, stride_h_slice, stride_h_m, stride_rank_lora,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    EVEN_K: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    """Grid: (max_blocks, SPLIT_K, num_slices). h[split, s, row, r] = sum over this split's K
    chunks (interleaved, BLOCK_K apart by SPLIT_K) of x[row] . A[slot, s, r].

    The tile map, the rank and the first chunk of A load before the PDL wait: none is written by an
    earlier kernel of the step (the tile map and the slots are filled before it starts), so only x
    (the previous kernels' output) is left after the wait. A decode step's LoRA kernels are tiny
    (a rank-16 shrink reads 0.4 MB), and their time was the chain of dependent loads after the wait
    (benchmarks/NOTES.md, lora_profile)."""
    tile = tl.program_id(0)
    split = tl.program_id(1)
    s = tl.program_id(2)
    slot = tl.load(block_slot_ptr + tile)
    slot_c = tl.maximum(slot, 0)  # an unused tile reads slot 0's metadata, then returns
    rank = tl.load(ranks_ptr + slot_c * stride_rank_lora + s)
    rows, m_mask = tile_rows(sorted_ids_ptr, block_start_ptr, block_end_ptr, tile, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < tl.where(slot >= 0, rank, 0)
    offs_kk = tl.arange(0, BLOCK_K)
    k_first = split * BLOCK_K
    a_ptrs = (a_ptr + slot_c.to(tl.int64) * stride_a_lora + s * stride_a_slice
              + offs_r[:, None] * stride_a_rank + (k_first + offs_kk)[None, :])
    x_ptrs = x_ptr + rows[:, None] * stride_xm + (k_first + offs_kk)[None, :]
    k_mask = offs_kk < K - k_first
    if EVEN_K:
        a = tl.load(a_ptrs, mask=r_mask[:, None], other=0.0)
    else:
        a = tl.load(a_ptrs, mask=r_mask[:, None] & k_mask[None, :], other=0.0)
    pdl_begin(USE_PDL)  # programmatic dependent launch: kernels/_triton_utils.py
    if slot < 0:
        return  # an unused tile: the base rows and empty slots make none
    if rank == 0:
        return  # the adapter does not target this slice; expand skips it too
    if EVEN_K:
        x = tl.load(x_ptrs)
    else:
        x = tl.load(x_ptrs, mask=k_mask[None, :], other=0.0)
    acc = shrink_dot(tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32), x, a, UPCAST, DOT_PRECISION)
    step = SPLIT_K * BLOCK_K
    acc = shrink_tile(acc, x_ptrs + step, a_ptrs + step, r_mask, offs_kk, k_first + step, K, step, EVEN_K, UPCAST,
                      DOT_PRECISION)
    h_ptrs = h_ptr + split * stride_h_split + s * stride_h_slice + rows[:, None] * stride_h_m + offs_r[None, :]
    tl.store(h_ptrs, acc, mask=m_mask[:, None] & (offs_r[None, :] < MAX_RANK))


@triton.jit
def _lora_expand_kernel(
    h_ptr, b_ptr, y_ptr, sorted_ids_ptr, block_slot_ptr, block_start_ptr, block_end_ptr, ranks_ptr,
    scaling_ptr, slice_starts_ptr, N, MAX_RANK, stride_h_split, stride_h_slice, stride_h_m,
    stride_b_lora, stride_b_rank, stride_ym, stride_rank_lora, stride_scale_lora,
    NUM_SLICES: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    """Grid: (max_blocks, cdiv(N, BLOCK_N)) over the concatenated slices. For each slice the column
    tile touches: acc += (scale * sum_split h[split, s, rows]) @ B^T[slot, :, its columns].

    As in the shrink, the tile map, the slice test and B's tile (all slices' columns of it, one
    load) come before the PDL wait; h and y after it."""
    tile = tl.program_id(0)
    nt = tl.program_id(1)
    slot = tl.load(block_slot_ptr + tile)
    slot_c = tl.maximum(slot, 0)  # an unused tile reads slot 0's metadata, then returns
    n_lo = nt * BLOCK_N
    touched = any_slice_in_tile(slice_starts_ptr, ranks_ptr, slot_c, stride_rank_lora, n_lo, NUM_SLICES, BLOCK_N)
    rows, m_mask = tile_rows(sorted_ids_ptr, block_start_ptr, block_end_ptr, tile, BLOCK_M)
    offs_n = n_lo + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    b_ptrs = b_ptr + slot_c.to(tl.int64) * stride_b_lora + offs_r[:, None] * stride_b_rank + offs_n[None, :]
    n_end = tl.where((slot >= 0) & touched, N, 0)  # nothing to load for a tile that returns
    b_tile = tl.load(b_ptrs, mask=(offs_r < MAX_RANK)[:, None] & (offs_n < n_end)[None, :], other=0.0)
    pdl_begin(USE_PDL)  # programmatic dependent launch: kernels/_triton_utils.py
    if slot < 0:
        return
    if not touched:
        return  # no targeted slice in these columns: y stays as the base layer wrote it
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for s in tl.static_range(NUM_SLICES):
        hit, lo, hi, rank = slice_in_tile(slice_starts_ptr, ranks_ptr, slot, s, stride_rank_lora, n_lo, BLOCK_N)
        if hit:
            r_mask = offs_r < rank
            h_ptrs = h_ptr + s * stride_h_slice + rows[:, None] * stride_h_m + offs_r[None, :]
            h_mask = m_mask[:, None] & r_mask[None, :]  # padded rows: no loads (decode tiles are mostly padding)
            h = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
            for split in tl.static_range(SPLIT_K):
                h += tl.load(h_ptrs + split * stride_h_split, mask=h_mask, other=0.0)
            # B rows past this slice's rank may hold an earlier adapter's values: zeroed here.
            b = tl.where(r_mask[:, None] & ((offs_n >= lo) & (offs_n < hi))[None, :], b_tile, 0.0)
            acc = expand_dot(acc, h, tl.load(scaling_ptr + slot * stride_scale_lora + s), b, UPCAST, DOT_PRECISION)
    add_to_rows(y_ptr, acc, rows, m_mask, offs_n, N, stride_ym)


@dataclass(frozen=True)
class LoRAKernelConfig:
    split_k: int
    block_k: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2


# Programs per SM the decode-sized (BLOCK_M 16) grids aim for. A decode step's LoRA kernels are pure
# weight reads spread over many tiny programs, so what sets their time is how many loads each SM
# has in flight, not the work per program: at 128 rows over 64 adapters (2 rows each) the former
# target of 2 per SM left each shrink program 8 dependent K-chunks and each expand program 2 KB of
# B, and the 128 LoRA kernels of a step read ~1.7 GB at ~0.8 TB/s (benchmarks/NOTES.md, lora_profile).
DECODE_PROGRAMS_PER_SM = 8
# The shrink's split-K stops at half that: in the graph-timed sweep (benchmarks/lora_tiles.py, H200)
# the best split at 128 and 256 rows over 64 adapters was 4 for qkv and 8 for o, which is where 4
# programs per SM puts them (8 per SM gave 8 and 16: 3% and 12% slower per layer).
SHRINK_PROGRAMS_PER_SM = 4
PREFILL_PROGRAMS_PER_SM = 2
EXPAND_BLOCK_NS = (256, 128, 64)


def lora_kernel_config(meta: LoRABatchMeta, in_features: int, num_slices: int,
                       sms: int = 132) -> LoRAKernelConfig:
    """Tiles from static shapes only. Split-K until the shrink grid covers the SMs a few times over
    (decode: few rows per tile; each split's partial plane is M x max_rank fp32, read back by expand).
    `block_n` here is for a 64-column output; lora_expand picks its own with expand_block_n."""
    block_k = min(256, max(MIN_BLOCK, next_pow2(in_features)))
    per_sm = SHRINK_PROGRAMS_PER_SM if meta.block_m == MIN_BLOCK else PREFILL_PROGRAMS_PER_SM
    split_k = 1
    while (split_k < MAX_SPLIT_K and meta.max_blocks * num_slices * split_k < per_sm * sms
           and in_features >= 2 * split_k * block_k):
        split_k *= 2
    return LoRAKernelConfig(split_k=split_k, block_k=block_k, block_n=64)


def expand_block_n(meta: LoRABatchMeta, out_features: int, sms: int = 132) -> int:
    """The expand's column tile: the widest that still gives a decode-sized step's grid
    DECODE_PROGRAMS_PER_SM programs per SM (many adapters: few wide programs, each loading 8 KB of B
    instead of 2 KB behind the same metadata loads); 64 where the grid is small anyway (one stream:
    2 tiles) and for prefill tiles (64 rows: the [64, BLOCK_N] fp32 accumulator stays small)."""
    if meta.block_m != MIN_BLOCK:
        return 64
    for block_n in EXPAND_BLOCK_NS:
        if meta.max_blocks * cdiv(out_features, block_n) >= DECODE_PROGRAMS_PER_SM * sms:
            return block_n
    return 64


def _check_shapes(x: torch.Tensor, lora_a: torch.Tensor, ranks: torch.Tensor, meta: LoRABatchMeta) -> None:
    if lora_a.dim() != 4 or x.dim() != 2 or x.shape[1] != lora_a.shape[3]:
        raise ValueError(f"lora: x {tuple(x.shape)} does not match A {tuple(lora_a.shape)} "
                         "([max_loras, num_slices, max_rank, in_features])")
    if x.shape[0] != meta.num_tokens or lora_a.shape[0] != meta.max_loras:
        raise ValueError(f"lora: {x.shape[0]} tokens / {lora_a.shape[0]} slots, but the batch meta was "
                         f"built for {meta.num_tokens} tokens / {meta.max_loras} slots")
    if tuple(ranks.shape) != tuple(lora_a.shape[:2]):
        raise ValueError(f"lora: ranks {tuple(ranks.shape)} must be [max_loras, num_slices]")
    if x.stride(1) != 1 or lora_a.stride(3) != 1:
        raise ValueError("lora: x rows and A rows must be contiguous")


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, ranks: torch.Tensor, meta: LoRABatchMeta,
                config: Optional[LoRAKernelConfig] = None) -> torch.Tensor:
    """Triton shrink. Returns the fp32 split-K partials [SPLIT_K, num_slices, M, max_rank]; rows of
    base tokens (and slices of rank 0) are left unwritten — expand never reads them."""
    _check_shapes(x, lora_a, ranks, meta)
    max_loras, num_slices, max_rank, k = lora_a.shape
    cfg = config or lora_kernel_config(meta, k, num_slices, num_sms(x.device) if x.is_cuda else 132)
    h = torch.empty((cfg.split_k, num_slices, meta.num_tokens, max_rank), dtype=torch.float32, device=x.device)
    if meta.max_blocks == 0:
        return h
    upcast, precision = dot_modes(lora_a.dtype)
    _lora_shrink_kernel[(meta.max_blocks, cfg.split_k, num_slices)](
        x, lora_a, h, meta.sorted_token_ids, meta.block_slot, meta.block_row_start, meta.block_row_end,
        ranks, k, max_rank, x.stride(0), lora_a.stride(0), lora_a.stride(1), lora_a.stride(2),
        h.stride(0), h.stride(1), h.stride(2), ranks.stride(0),
        BLOCK_M=meta.block_m, BLOCK_R=max(MIN_BLOCK, next_pow2(max_rank)), BLOCK_K=cfg.block_k,
        SPLIT_K=cfg.split_k, EVEN_K=k % (cfg.block_k * cfg.split_k) == 0, UPCAST=upcast,
        DOT_PRECISION=precision, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_launch(x))
    return h


def lora_expand(y: torch.Tensor, shrunk: torch.Tensor, lora_b: torch.Tensor, ranks: torch.Tensor,
                scaling: torch.Tensor, meta: LoRABatchMeta, slice_starts: torch.Tensor,
                config: Optional[LoRAKernelConfig] = None) -> None:
    """Triton expand, in place: y[t, slice s] += scale * h_s[t] @ B_s^T for every adapter token.
    `shrunk` is lora_shrink's partial buffer; `slice_starts` comes from slice_starts_for."""
    max_loras, max_rank, n = lora_b.shape
    split_k, num_slices = shrunk.shape[0], shrunk.shape[1]
    if y.dim() != 2 or y.shape != (meta.num_tokens, n) or y.stride(1) != 1 or lora_b.stride(2) != 1:
        raise ValueError(f"lora: y {tuple(y.shape)} must be a row-contiguous [{meta.num_tokens}, {n}] "
                         f"to match B {tuple(lora_b.shape)} ([max_loras, max_rank, out_features])")
    if slice_starts.shape != (num_slices + 1,) or tuple(scaling.shape) != tuple(ranks.shape):
        raise ValueError("lora: slice_starts must have num_slices + 1 entries and scaling match ranks")
    if meta.max_blocks == 0 or n == 0:
        return
    block_n = config.block_n if config is not None else expand_block_n(meta, n, num_sms(y.device) if y.is_cuda else 132)
    upcast, precision = dot_modes(lora_b.dtype)
    _lora_expand_kernel[(meta.max_blocks, cdiv(n, block_n))](
        shrunk, lora_b, y, meta.sorted_token_ids, meta.block_slot, meta.block_row_start, meta.block_row_end,
        ranks, scaling, slice_starts, n, max_rank, shrunk.stride(0), shrunk.stride(1), shrunk.stride(2),
        lora_b.stride(0), lora_b.stride(1), y.stride(0), ranks.stride(0), scaling.stride(0),
        NUM_SLICES=num_slices, SPLIT_K=split_k, BLOCK_M=meta.block_m, BLOCK_N=block_n,
        BLOCK_R=max(MIN_BLOCK, next_pow2(max_rank)), UPCAST=upcast, DOT_PRECISION=precision,
        num_warps=config.num_warps if config is not None else 4, **pdl_launch(shrunk))


def add_lora(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
             ranks: torch.Tensor, scaling: torch.Tensor, meta: LoRABatchMeta,
             slice_sizes: Sequence[int], slice_starts: torch.Tensor) -> None:
    """y += the LoRA delta of every adapter token, in place (y: the fused base projection's output).
    CUDA: shrink + expand, or for decode-sized steps with AGENTSERVE_LORA_FUSED=1 the one-launch
    kernel of kernels/lora_fused.py; elsewhere the gather + bmm reference."""
    if not triton_enabled_for(x):
        add_lora_ref(y, x, lora_a, lora_b, ranks, scaling, meta.token_slots, slice_sizes)
    elif use_fused_lora(meta.num_tokens):
        add_lora_fused(y, x, lora_a, lora_b, ranks, scaling, meta, slice_starts)
    else:
        lora_expand(y, lora_shrink(x, lora_a, ranks, meta), lora_b, ranks, scaling, meta, slice_starts)
