"""Attention of a flat batch of variable-length query chunks over paged KV.

One entry point serves prefill chunks with a cached prefix, single-token decode and multi-token
verification: request b owns queries [query_start_loc[b], query_start_loc[b+1]) whose absolute
positions are the last q_len positions of its seq_lens[b] tokens; each query attends causally to
keys 0..its own position, read through block_tables[b].

An fp8 (e4m3) cache holds K / k_scale and V / v_scale with one fp32 scale per layer (`k_scale`,
`v_scale`: [1] device tensors). The kernels load the fp8 tiles (half the bytes of bf16), convert
them to the query dtype in registers for the tensor-core dots, fold k_scale into the softmax scale
and v_scale into the output, and accumulate in fp32 as for 16-bit caches.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Union

import torch

from ._triton_utils import cdiv, next_pow2, num_sms, pdl_begin, pdl_launch, tl, triton, triton_enabled_for
from .fp8_utils import is_fp8, raw_bytes
from .kv_write import kv_scales_or_ones


def paged_attention_ref(
    q: torch.Tensor,             # [T, Hq, D]
    k_cache: torch.Tensor,       # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int32 (unused entries: any valid block id)
    query_start_loc: torch.Tensor,  # [B + 1] int32
    seq_lens: torch.Tensor,      # [B] int32: context length including this step's queries
    scale: float,
    max_query_len: int,
    max_seq_len: int,
    k_scale: Optional[torch.Tensor] = None,  # [1] fp32: required for an fp8 cache, else unused
    v_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Vectorised torch reference: pads queries to [B, max_query_len] and gathers each request's
    pages into [B, max_seq_len], then masks. Memory is O(B * max_seq_len); fine for the reference.
    It is also the CPU engine's attention, so the gathered K / V are never copied again: one
    index_select of whole pages, then one batched matmul per kv head reading its strided [Lk, D] rows
    in place (a single matmul over [B, Hkv, Lk, D] would first copy K and V head-major: ~2x the time
    at a CPU decode batch of hundreds of rows)."""
    num_tokens, num_q_heads, head_dim = q.shape
    batch = seq_lens.shape[0]
    num_blocks, block_size, num_kv_heads = k_cache.shape[0], k_cache.shape[1], k_cache.shape[2]
    device = q.device
    q_lens = (query_start_loc[1:] - query_start_loc[:-1]).long()
    seq_lens_l = seq_lens.long()

    # Queries -> padded [B, Lq]: token t of request b sits at column t - start[b].
    token_req = torch.repeat_interleave(torch.arange(batch, device=device), q_lens, output_size=num_tokens)
    token_col = torch.arange(num_tokens, device=device) - query_start_loc[:-1].long()[token_req]
    q_pad = q.new_zeros(batch, max_query_len, num_q_heads, head_dim)
    q_pad[token_req, token_col] = q

    # Keys/values gathered through the block table -> [B, Lk, Hkv, D], a page per index. Gathered as
    # raw bytes: indexing is not implemented for fp8 on every device.
    num_blocks_needed = (max_seq_len + block_size - 1) // block_size
    pages = block_tables[:, :num_blocks_needed].reshape(-1).long()
    gathered_shape = (batch, num_blocks_needed * block_size, num_kv_heads, head_dim)
    k = raw_bytes(k_cache).reshape(num_blocks, -1).index_select(0, pages).view(k_cache.dtype)
    v = raw_bytes(v_cache).reshape(num_blocks, -1).index_select(0, pages).view(v_cache.dtype)
    k = k.view(gathered_shape)[:, :max_seq_len].float()
    v = v.view(gathered_shape)[:, :max_seq_len].float()

    # Query i of request b is at absolute position seq_len - q_len + i.
    q_pos = (seq_lens_l - q_lens)[:, None] + torch.arange(max_query_len, device=device)[None, :]
    k_pos = torch.arange(max_seq_len, device=device)
    in_context = k_pos[None, :] < seq_lens_l[:, None]  # [B, Lk]
    mask = (k_pos[None, None, :] <= q_pos[:, :, None]) & in_context[:, None, :]
    # Slots past a row's context hold whatever a page's earlier owner left: an inf there times its zero
    # probability is NaN in this row's output (a request whose weights overflowed poisoned later requests
    # reusing its pages). v is this call's own gather (index_select copies), so it is zeroed in place.
    v.masked_fill_(~in_context[:, :, None, None], 0.0)

    # GQA without repeating K/V: the group's query heads become extra query rows of their kv head.
    group = num_q_heads // num_kv_heads
    qh = q_pad.float().reshape(batch, max_query_len, num_kv_heads, group, head_dim)
    qh = qh.permute(0, 2, 3, 1, 4).reshape(batch, num_kv_heads, group * max_query_len, head_dim)
    # An fp8 cache's per-layer scales multiply every score and every output alike: applied to those
    # (smaller) tensors instead of to the dequantized K and V.
    k_scale_f: Union[float, torch.Tensor] = 1.0
    v_scale_f: Union[float, torch.Tensor] = 1.0
    if is_fp8(k_cache):
        k_scale, v_scale = kv_scales_or_ones(k_cache, k_scale, v_scale)
        k_scale_f, v_scale_f = k_scale.float(), v_scale.float()
    scores = torch.stack([torch.matmul(qh[:, h], k[:, :, h].transpose(1, 2)) for h in range(num_kv_heads)], dim=1)
    scores = scores * (k_scale_f * scale)                  # [B, Hkv, G * Lq, Lk]
    scores = scores.view(batch, num_kv_heads, group, max_query_len, max_seq_len)
    scores = scores.masked_fill(~mask[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # padded query rows have no keys
    probs = probs.view(batch, num_kv_heads, group * max_query_len, max_seq_len)
    out = torch.stack([torch.matmul(probs[:, h], v[:, :, h]) for h in range(num_kv_heads)], dim=1) * v_scale_f
    out = out.view(batch, num_kv_heads, group, max_query_len, head_dim)
    out = out.permute(0, 3, 1, 2, 4).reshape(batch, max_query_len, num_q_heads, head_dim)
    return out[token_req, token_col].to(q.dtype)


# ---------------------------------------------------------------------------------------------
# Triton kernels
#
# Layout of one program's tile (GQA packing): the BLOCK_M rows of the query tile are
# BLOCK_Q = BLOCK_M // GROUP consecutive query tokens x the GROUP query heads that share one KV
# head (row r = token r // GROUP, head r % GROUP). K/V pages are then read once per kv head for the
# whole group, and a decode step (one token) still fills GROUP rows of the tl.dot instead of one.
#
# Softmax runs in the log2 domain: scores are multiplied by scale * log2(e) and exponentiated with
# exp2, which maps to one MUFU instruction. Running max starts at a large finite negative value
# (not -inf) so that exp2(m_old - m_new) never evaluates -inf - -inf = nan.
# ---------------------------------------------------------------------------------------------

_LOG2E = 1.4426950408889634
# Kernels spell the finite "minus infinity" -1.0e30 inline: Triton rejects non-constexpr globals.


@triton.jit
def _load_kv_tile(ptrs, row_mask, d_mask, MASK_ROWS: tl.constexpr, PAD_D: tl.constexpr):
    # Masks only where needed: an unmasked load lets Triton vectorise along D (the common case,
    # HEAD_DIM a power of two, full tiles).
    if MASK_ROWS:
        if PAD_D:
            tile = tl.load(ptrs, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        else:
            tile = tl.load(ptrs, mask=row_mask[:, None], other=0.0)
    else:
        if PAD_D:
            tile = tl.load(ptrs, mask=d_mask[None, :], other=0.0)
        else:
            tile = tl.load(ptrs)
    return tile


@triton.jit
def _attend_kv_tile(
    acc, l_i, m_i, q, q_pos,
    k_cache_ptr, v_cache_ptr, bt_row_ptr, kv_head, start_n, seq_len, qk_scale,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    offs_n, offs_d, d_mask,
    PAGE_SIZE: tl.constexpr, MASK: tl.constexpr, PAD_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    """One online-softmax step over keys [start_n, start_n + BLOCK_N) of one request.

    MASK=False is the hot path: every key is valid and visible to every row, so no compares or
    selects. MASK=True applies causality (key <= q_pos of the row, q_pos already clamped to
    seq_len - 1, which also hides keys past the sequence end) and masks the loads past seq_len
    (those slots may hold uninitialised memory; a NaN read into V would poison 0 * NaN)."""
    kv_idx = start_n + offs_n
    # Page of each key through the block table. The same page id is read by PAGE_SIZE lanes; those
    # loads hit L1. Casting to int64 before the multiply keeps caches over 2^31 elements addressable.
    if MASK:
        kv_valid = kv_idx < seq_len
        page = tl.load(bt_row_ptr + kv_idx // PAGE_SIZE, mask=kv_valid, other=0).to(tl.int64)
    else:
        kv_valid = kv_idx >= 0  # unused
        page = tl.load(bt_row_ptr + kv_idx // PAGE_SIZE).to(tl.int64)
    slot = (kv_idx % PAGE_SIZE).to(tl.int64)

    k_ptrs = (k_cache_ptr + page[:, None] * stride_kb + slot[:, None] * stride_ks + kv_head * stride_kh
              + offs_d[None, :])
    k = _load_kv_tile(k_ptrs, kv_valid, d_mask, MASK, PAD_D)
    if KV_FP8:  # e4m3 -> the query dtype in registers (k_scale is folded into qk_scale)
        k = k.to(q.dtype)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N] fp32
    qk = qk * qk_scale
    if MASK:
        qk = tl.where(kv_idx[None, :] <= q_pos[:, None], qk, float("-inf"))

    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)

    v_ptrs = (v_cache_ptr + page[:, None] * stride_vb + slot[:, None] * stride_vs + kv_head * stride_vh
              + offs_d[None, :])
    v = _load_kv_tile(v_ptrs, kv_valid, d_mask, MASK, PAD_D)
    if KV_FP8:  # v_scale is applied to the output
        v = v.to(q.dtype)
    acc = acc * alpha[:, None]
    # P in the cache dtype (bf16/fp16) for the tensor cores, as FlashAttention does; accumulate fp32.
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


# num_seqs and the block-table row stride (the step's widest table) change every step: Triton would
# specialise them (== 1, divisible by 16) and compile new variants mid-serving for no speed gain.
@triton.jit(do_not_specialize=["num_seqs", "stride_bt"])
def _paged_attention_kernel(
    out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, query_start_loc_ptr, seq_lens_ptr,
    k_scale_ptr, v_scale_ptr, qk_scale, num_seqs,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
    PAD_D: tl.constexpr, DOT_PRECISION: tl.constexpr, KV_FP8: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    """Grid: (num_q_tiles_upper_bound, num_kv_heads).

    Query tiles are numbered globally: request b owns tile ids starting at
    query_start_loc[b] // BLOCK_Q + b, which is an upper bound that needs no host-side prefix sum
    (each request wastes at most one id). The grid size T // BLOCK_Q + B therefore depends only on
    shapes, so a mixed batch of one long prefill chunk and many decodes launches no idle programs
    beyond B, and the launch is CUDA-graph safe."""
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)

    # Which request owns this tile: count the requests whose first tile id is <= pid (one vector
    # load of query_start_loc instead of a serial binary search of dependent loads).
    offs_b = tl.arange(0, BLOCK_B)
    b_mask = offs_b < num_seqs
    starts = tl.load(query_start_loc_ptr + offs_b, mask=b_mask, other=0)
    first_tile = starts // BLOCK_Q + offs_b
    seq_idx = tl.sum(((first_tile <= pid) & b_mask).to(tl.int32), 0) - 1

    q_start = tl.load(query_start_loc_ptr + seq_idx)
    q_len = tl.load(query_start_loc_ptr + seq_idx + 1) - q_start
    tile = pid - (q_start // BLOCK_Q + seq_idx)
    seq_len = tl.load(seq_lens_ptr + seq_idx)
    if KV_FP8:
        qk_scale = qk_scale * tl.load(k_scale_ptr)
    # The tile map above is step metadata (filled before the step's first kernel): it loads before
    # the PDL wait; q and the keys after it.
    pdl_begin(USE_PDL)  # programmatic dependent launch: kernels/_triton_utils.py
    if tile * BLOCK_Q >= q_len:
        return
    ctx_len = seq_len - q_len  # cached prefix: the queries are the last q_len positions

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    tok = tile * BLOCK_Q + offs_m // GROUP            # token index inside the request
    head = kv_head * GROUP + offs_m % GROUP           # query head
    row_valid = (offs_m < BLOCK_Q * GROUP) & (tok < q_len)
    # Absolute position of each row; padding rows are clamped onto the last real position so that
    # they always see at least key 0 (no empty softmax rows) and never keys past seq_len.
    q_pos = tl.minimum(ctx_len + tok, seq_len - 1)

    q_row = (q_start + tok).to(tl.int64)
    q_ptrs = q_ptr + q_row[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_valid[:, None] & d_mask[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    bt_row = block_tables_ptr + seq_idx.to(tl.int64) * stride_bt

    # Keys 0..p_min are visible to every row of the tile: those KV tiles need no mask at all.
    # Only the tiles overlapping [p_min + 1, p_max] (at most BLOCK_Q / BLOCK_N + 1 of them) are
    # masked; for decode that is just the last tile.
    p_min = ctx_len + tile * BLOCK_Q
    p_max = ctx_len + tl.minimum(tile * BLOCK_Q + BLOCK_Q, q_len) - 1
    num_full = (p_min + 1) // BLOCK_N
    num_all = (p_max + BLOCK_N) // BLOCK_N
    for j in range(0, num_full):
        acc, l_i, m_i = _attend_kv_tile(
            acc, l_i, m_i, q, q_pos, k_cache_ptr, v_cache_ptr, bt_row, kv_head, j * BLOCK_N, seq_len,
            qk_scale, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
            offs_n, offs_d, d_mask, PAGE_SIZE, False, PAD_D, DOT_PRECISION, KV_FP8)
    for j in range(num_full, num_all):
        acc, l_i, m_i = _attend_kv_tile(
            acc, l_i, m_i, q, q_pos, k_cache_ptr, v_cache_ptr, bt_row, kv_head, j * BLOCK_N, seq_len,
            qk_scale, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
            offs_n, offs_d, d_mask, PAGE_SIZE, True, PAD_D, DOT_PRECISION, KV_FP8)

    # l_i == 0 only for a request with seq_len == 0 (padding); the reference outputs 0 there.
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    if KV_FP8:
        out = out * tl.load(v_scale_ptr)
    o_ptrs = out_ptr + q_row[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & d_mask[None, :])


@triton.jit
def _split_chunk_len(seq_len, num_splits, BLOCK_N: tl.constexpr):
    # Keys per split, rounded up to whole KV tiles so only the sequence's last split has a partial
    # tile. Computed from seq_len on the device (not from max_seq_len on the host), so a CUDA graph
    # captured once stays correct for any context length; at least one tile to avoid a zero chunk.
    per_split = (seq_len + num_splits - 1) // num_splits
    chunk = (per_split + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    return tl.maximum(chunk, BLOCK_N)


@triton.jit(do_not_specialize=["stride_bt"])
def _paged_attention_split_kernel(
    part_out_ptr, part_ml_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, query_start_loc_ptr,
    seq_lens_ptr, k_scale_ptr, v_scale_ptr, qk_scale, num_splits,
    stride_qt, stride_qh,
    stride_pt, stride_ph, stride_ps, stride_mt, stride_mh, stride_ms,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAD_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    KV_FP8: tl.constexpr, BLOCK_Q: tl.constexpr = 1,
    USE_PDL: tl.constexpr = False,
):
    """Flash-decoding phase 1. Grid: (B, num_kv_heads, num_splits); each sequence's query is its last
    q_len <= BLOCK_Q tokens (decode: 1; a speculative verification: k + 1), causal among themselves.
    num_splits is a runtime argument so that each split count does not compile a new kernel.

    Writes, per (token, head, split), the unnormalised accumulator and the running (max, sum) of
    the split's keys; the reduce kernel combines them with a log-sum-exp. A row that sees none of a
    split's keys (its last keys, after the row's token) leaves max -1e30 and sum 0: weight 0 there."""
    seq_idx = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    # The step's metadata (filled before its first kernel) and the fp8 scales load before the PDL
    # wait; q and the newest keys (the previous kernels' output) after it.
    q_start = tl.load(query_start_loc_ptr + seq_idx)
    q_len = tl.load(query_start_loc_ptr + seq_idx + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq_idx)
    if KV_FP8:
        qk_scale = qk_scale * tl.load(k_scale_ptr)
        v_scale = tl.load(v_scale_ptr)
    pdl_begin(USE_PDL)  # programmatic dependent launch: kernels/_triton_utils.py
    if q_len <= 0:
        return
    chunk = _split_chunk_len(seq_len, num_splits, BLOCK_N)
    kv_start = split * chunk
    if kv_start >= seq_len:
        return  # the reduce kernel recomputes which splits exist and never reads this one
    kv_end = tl.minimum(kv_start + chunk, seq_len)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    # Row r is token r // GROUP of the query (at position seq_len - q_len + that) and head r % GROUP.
    tok = offs_m // GROUP
    row_valid = (tok < q_len) & (tok < BLOCK_Q)
    head = kv_head * GROUP + offs_m % GROUP
    q_pos = seq_len - q_len + tok
    q_row = q_start.to(tl.int64) + tok
    q_ptrs = q_ptr + q_row[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_valid[:, None] & d_mask[None, :], other=0.0)
    # Keys before the first query token's position + 1 are visible to every row: unmasked tiles; the
    # rest (causality among the query tokens, the sequence end) go through the masked tiles.
    visible_end = tl.minimum(kv_end, seq_len - q_len + 1)

    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    bt_row = block_tables_ptr + seq_idx.to(tl.int64) * stride_bt

    num_full = tl.maximum(visible_end - kv_start, 0) // BLOCK_N
    num_all = (kv_end - kv_start + BLOCK_N - 1) // BLOCK_N
    for j in range(0, num_full):
        acc, l_i, m_i = _attend_kv_tile(
            acc, l_i, m_i, q, q_pos, k_cache_ptr, v_cache_ptr, bt_row, kv_head, kv_start + j * BLOCK_N,
            seq_len, qk_scale, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
            offs_n, offs_d, d_mask, PAGE_SIZE, False, PAD_D, DOT_PRECISION, KV_FP8)
    for j in range(num_full, num_all):
        acc, l_i, m_i = _attend_kv_tile(
            acc, l_i, m_i, q, q_pos, k_cache_ptr, v_cache_ptr, bt_row, kv_head, kv_start + j * BLOCK_N,
            seq_len, qk_scale, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
            offs_n, offs_d, d_mask, PAGE_SIZE, True, PAD_D, DOT_PRECISION, KV_FP8)

    if KV_FP8:
        acc = acc * v_scale  # the partials combine linearly: scale each once here
    p_ptrs = (part_out_ptr + q_row[:, None] * stride_pt + head[:, None] * stride_ph + split * stride_ps
              + offs_d[None, :])
    tl.store(p_ptrs, acc, mask=row_valid[:, None] & d_mask[None, :])
    ml_ptrs = part_ml_ptr + q_row * stride_mt + head * stride_mh + split * stride_ms
    tl.store(ml_ptrs, m_i, mask=row_valid)
    tl.store(ml_ptrs + 1, l_i, mask=row_valid)


@triton.jit
def _paged_attention_split_reduce_kernel(
    out_ptr, part_out_ptr, part_ml_ptr, query_start_loc_ptr, seq_lens_ptr, num_splits,
    stride_ot, stride_oh, stride_pt, stride_ph, stride_ps, stride_mt, stride_mh, stride_ms,
    BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    """Flash-decoding phase 2. Grid: (B, num_q_heads, query tokens). out = sum_s w_s acc_s / sum_s w_s l_s
    with w_s = 2^(m_s - max_s m_s) over the splits that hold keys of this sequence."""
    seq_idx = tl.program_id(0)
    head = tl.program_id(1)
    tok = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq_idx)  # metadata: before the PDL wait
    q_len = tl.load(query_start_loc_ptr + seq_idx + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq_idx)
    pdl_begin(USE_PDL)  # programmatic dependent launch: kernels/_triton_utils.py
    if tok >= q_len:
        return
    chunk = _split_chunk_len(seq_len, num_splits, BLOCK_N)
    num_valid = (seq_len + chunk - 1) // chunk  # 0 when seq_len == 0: output 0, like the reference

    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_valid
    q_row = q_start.to(tl.int64) + tok
    ml_ptrs = part_ml_ptr + q_row * stride_mt + head * stride_mh + offs_s * stride_ms
    m = tl.load(ml_ptrs, mask=s_mask, other=-1.0e30)
    l = tl.load(ml_ptrs + 1, mask=s_mask, other=0.0)
    w = tl.where(s_mask, tl.exp2(m - tl.max(m, 0)), 0.0)
    p_ptrs = part_out_ptr + q_row * stride_pt + head * stride_ph + offs_s[:, None] * stride_ps + offs_d[None, :]
    acc = tl.load(p_ptrs, mask=s_mask[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    num = tl.sum(acc * w[:, None], 0)
    den = tl.sum(l * w, 0)
    out = num / tl.where(den > 0.0, den, 1.0)
    tl.store(out_ptr + q_row * stride_ot + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


# ---------------------------------------------------------------------------------------------
# Launch configuration and the split-KV heuristic
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AttnConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def attention_config(head_dim: int, group: int, max_query_len: int, dtype: torch.dtype) -> AttnConfig:
    """Tile sizes for the unified kernel on Hopper (head_dim 64/128; pages 16/32 — BLOCK_N need
    not match the page size because keys are gathered through the block table per key).

    - BLOCK_M covers max_query_len * GROUP rows when that is small (decode: 1 token x GROUP heads;
      verification: k+1 tokens x GROUP heads), so tl.dot pads few rows; these memory-bound shapes
      compile to mma.sync and stream K/V through cp.async, in decode_tile's key tiles.
    - Larger queries (prefill chunks, mixed steps) use PREFILL_TILE: 64 rows (16 tokens x 4 heads of
      an 8B), 64 keys, 4 warps, 3 stages.
    - fp32 (tests, tiny models) uses 16x16 tiles: fp32 operands with exact ("ieee") dots spill
      heavily at larger tiles; speed does not matter there, exactness does.
    `python benchmarks/attention_mixed.py` and `attention_short.py` time alternatives on the GPU."""
    min_m = max(16, next_pow2(group))
    if dtype == torch.float32:
        return AttnConfig(min_m, 16, num_warps=4, num_stages=2)
    rows = max(1, max_query_len) * group
    block_m = max(min_m, min(PREFILL_TILE[0], next_pow2(rows)))
    if block_m <= 32:
        block_n, stages = decode_tile(head_dim)
        return AttnConfig(block_m, block_n, num_warps=4, num_stages=stages)
    _, block_n, warps, stages = PREFILL_TILE
    return AttnConfig(block_m, block_n, num_warps=warps, num_stages=stages if head_dim <= 128 else 2)


def _tile_from_env(name: str, default: tuple[int, ...]) -> tuple[int, ...]:
    """A comma-separated override of a tile (A/B runs), checked: sizes and warps are powers of two, as the
    kernels need; the last value is the pipeline's stage count."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    values = tuple(int(v) for v in raw.split(","))
    if len(values) != len(default) or any(v < 1 for v in values) or any(v & (v - 1) for v in values[:-1]):
        raise ValueError(f"{name}={raw!r}: {len(default)} comma-separated values, like {','.join(map(str, default))} "
                         "(powers of two but the last, the stage count)")
    return values


# Prefill and mixed steps: (BLOCK_M, BLOCK_N, num_warps, num_stages). Graph-timed on the H200
# (benchmarks/attention_mixed.py, 2026-12-03, us per layer, this tile against the earlier 128 x 64 / 8
# warps / 3 stages, FlashAttention-2's): the agent loop's mixed steps (26 decode rows beside 8 chunks of
# 200 tokens, or turns of 1,100 + 560 tokens, all over 2k-11k-token contexts) 866 / 781 against 1,156 /
# 1,056; a 2,048-token chunk after 6,144 cached tokens 737 against 804; a whole 8,192-token prompt 1,590
# against 1,677; 16 prompts of 64-512 tokens 130 against 137. In mixed steps a decode row fills a whole
# query tile (GROUP valid rows of BLOCK_M) and walks its context with it, and chunks pad less to 16-token
# tiles. 128 x 128 / 8 warps / 2 stages was ~4% faster still on the long prompts alone (711 / 1,530)
# and 8-20% slower on the mixed and short ones: not taken (one tile, correctness-tested on the GPU).
# AGENTSERVE_PREFILL_TILE=128,64,8,3 restores the earlier tile (A/B runs).
PREFILL_TILE: tuple[int, ...] = _tile_from_env("AGENTSERVE_PREFILL_TILE", (64, 64, 4, 3))
if PREFILL_TILE[0] < 64 or PREFILL_TILE[1] < 16:
    raise ValueError("AGENTSERVE_PREFILL_TILE: BLOCK_M >= 64 (smaller query tiles are the decode tiles) and "
                     "BLOCK_N >= 16 (tl.dot's smallest)")

# Keys per iteration and pipeline depth of the memory-bound decode / verification tiles (unified and
# split kernels). A stage holds a K and a V tile (2 x BLOCK_N x head_dim elements), so wider tiles need
# fewer stages: each program walks its keys as a chain of dependent load-dot-softmax-dot tiles, and
# fewer, wider tiles shorten it. Graph-timed on the H200 (benchmarks/attention_short.py and
# attention_mixed.py, 2026-12-03): 128 keys x 2 stages beat the earlier 64 x 5 in every case measured:
# batch 1 over 128-1,000 keys (18 cases: decode split and unified, the 5-query verification, 8B and
# 1B layouts; 8B split decode at 300 keys 8.7 -> 7.2 us), 27 rows over 2k-11k keys (split 218.9 ->
# 202.7 us) and batch 256 over 64-512 keys (102.4 -> 85.5 us). Head dims above 128 keep 64 x 5 (two
# wide K and V stages would not fit shared memory). AGENTSERVE_DECODE_TILE=64,5 forces a tile.
DECODE_TILE: tuple[int, ...] = _tile_from_env("AGENTSERVE_DECODE_TILE", (128, 2))
if DECODE_TILE[0] < 16:
    raise ValueError("AGENTSERVE_DECODE_TILE: keys per tile >= 16 (tl.dot's smallest)")
DECODE_TILE_LARGE_HEADS: tuple[int, int] = (64, 5)
# A tile forced through the environment holds for large heads too (read once, as _tile_from_env reads it).
_DECODE_TILE_FORCED: bool = bool(os.environ.get("AGENTSERVE_DECODE_TILE"))


def decode_tile(head_dim: int) -> tuple[int, int]:
    """(keys per KV tile, pipeline stages) of the decode / verification kernels."""
    if head_dim > 128 and not _DECODE_TILE_FORCED:
        return DECODE_TILE_LARGE_HEADS
    return DECODE_TILE[0], DECODE_TILE[1]


# Split-KV heuristic constants (see use_split_kv). Tuned by `python benchmarks/kernel_suite.py`, which
# prints the crossover it measures.
SPLIT_TARGET_WAVES: float = 2.0   # aim for this many programs per SM after splitting
# Never give a split fewer keys. Measured on the H100 outside a CUDA graph (where the reduce kernel's
# launch counted): at 512 keys B=1 unsplit wins. Inside a graph with PDL at batch 1 an unsplit decode
# runs 8 programs (one per KV head of an 8B) and took ~10 us per layer at ~300 keys on the H200.
# There (graphs + PDL, 128-token prompt, 256 new) 512 / 128 / 64 gave 231.2 / 235.2 / 235.8 tok/s
# one stream (benchmarks/NOTES.md); AGENTSERVE_SPLIT_MIN_KEYS keeps the A/B reproducible.
SPLIT_MIN_KEYS: int = int(os.environ.get("AGENTSERVE_SPLIT_MIN_KEYS", "64"))
SPLIT_MAX: int = 64                # partial-result buffer bound; plenty for 128k contexts
# Queries of up to this many tokens per sequence (a speculative verification's k + 1, a draft's
# catch-up) split too: at batch 1 a verification of 5 tokens otherwise runs one program per KV head
# (8 of 132 SMs). On since the H200 A/Bs (A = 0.8, k = 4 iteration -0.9% in the eleventh session, -1.5%
# and -1.8% in the fifteenth: benchmarks/NOTES.md); AGENTSERVE_SPLIT_MAX_QUERY_LEN=1 splits decode rows
# only (the kernels accept up to SPLIT_QUERY_LEN_LIMIT tokens).
SPLIT_QUERY_LEN_LIMIT: int = 8
SPLIT_MAX_QUERY_LEN: int = int(os.environ.get("AGENTSERVE_SPLIT_MAX_QUERY_LEN", "8"))
if not 1 <= SPLIT_MAX_QUERY_LEN <= SPLIT_QUERY_LEN_LIMIT:
    raise ValueError(f"AGENTSERVE_SPLIT_MAX_QUERY_LEN={SPLIT_MAX_QUERY_LEN}: 1 to {SPLIT_QUERY_LEN_LIMIT}")
# Long contexts at batches whose decode grid already fills the SMs (on by default since its H200 A/B on
# the agent loop, 2026-12-03: decode-only steps 16.2 -> 14.2 ms, sessions p95 6.5 -> 6.2 s;
# AGENTSERVE_SPLIT_LONG=0 turns it off): one program per (request, kv head) streams its whole context,
# so the step waits for the longest request's programs (agent sessions: 2k-11k tokens side by side)
# and for a partial last wave (batch 26 x 8 heads = 208 programs on 132 SMs). A few splits of at
# least SPLIT_LONG_MIN_KEYS keys, for about SPLIT_LONG_WAVES waves, let the SMs share the long rows.
SPLIT_LONG: bool = os.environ.get("AGENTSERVE_SPLIT_LONG", "1") == "1"
SPLIT_LONG_MIN_CONTEXT: int = 4096
SPLIT_LONG_MIN_KEYS: int = 1024
SPLIT_LONG_WAVES: float = float(os.environ.get("AGENTSERVE_SPLIT_LONG_WAVES", "4"))


def num_kv_splits(batch: int, max_seq_len: int, num_kv_heads: int, num_sms: int) -> int:
    """How many KV partitions per sequence the flash-decoding path should use (1 = don't split).

    The unified kernel runs one program per (request, kv head) for decode. When batch * kv_heads
    is below the SM count, SMs sit idle and each program streams a whole long context alone, far
    from the HBM bandwidth. Splitting each sequence into S partitions multiplies the programs by S;
    we pick S so that there are about SPLIT_TARGET_WAVES programs per SM, but never fewer than
    SPLIT_MIN_KEYS keys per partition (short contexts gain nothing and pay the reduce kernel). With
    SPLIT_LONG, contexts of SPLIT_LONG_MIN_CONTEXT keys or more split at full grids too (see there)."""
    programs = max(1, batch * num_kv_heads)
    if programs >= num_sms:
        if not SPLIT_LONG or max_seq_len < SPLIT_LONG_MIN_CONTEXT:
            return 1
        want = cdiv(int(SPLIT_LONG_WAVES * num_sms), programs)
        return max(1, min(want, max_seq_len // SPLIT_LONG_MIN_KEYS, SPLIT_MAX))
    want = int(SPLIT_TARGET_WAVES * num_sms) // programs
    by_len = max_seq_len // SPLIT_MIN_KEYS
    return max(1, min(want, by_len, SPLIT_MAX))


def use_split_kv(batch: int, max_seq_len: int, num_kv_heads: int, num_sms: int) -> bool:
    """Flash-decoding pays off when the decode grid (batch * kv_heads programs) leaves SMs idle and
    the contexts are long enough to give each partition >= SPLIT_MIN_KEYS keys; i.e. when
    num_kv_splits(...) > 1. For Llama-3.1-8B (8 kv heads) on an H100 (132 SMs) that is batch <= 16
    with max_seq_len >= 2 * SPLIT_MIN_KEYS (batch 16 -> 2 splits; batch 1 -> up to 33 splits)."""
    return num_kv_splits(batch, max_seq_len, num_kv_heads, num_sms) > 1


# ---------------------------------------------------------------------------------------------
# Python wrappers (no device->host syncs: everything below reads shapes and Python ints only)
# ---------------------------------------------------------------------------------------------

def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact fp32 products ("ieee"); the default tf32 would miss 1e-4 tolerances and
    # the bit-for-bit greedy comparison against the reference. Ignored for 16-bit inputs.
    return "ieee" if dtype == torch.float32 else "tf32"


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_shapes(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, int, int, int]:
    num_tokens, num_q_heads, head_dim = q.shape
    _, page_size, num_kv_heads, kd = k_cache.shape
    if kd != head_dim or v_cache.shape != k_cache.shape:
        raise ValueError(f"cache shapes {tuple(k_cache.shape)}/{tuple(v_cache.shape)} do not match q {tuple(q.shape)}")
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads are not a multiple of {num_kv_heads} kv heads")
    if page_size & (page_size - 1):
        raise ValueError(f"page size {page_size} must be a power of two")
    return num_q_heads, num_kv_heads, head_dim, page_size


def batch_block(batch: int) -> int:
    """Width of the kernel's vector lookup of which request owns a tile (a constexpr). Coarse on
    purpose: each distinct value is one more Triton compile, and 64 lanes cost no more than 16."""
    return max(64, next_pow2(batch))


def warmup_unified_variants(k_cache: torch.Tensor, v_cache: torch.Tensor, num_q_heads: int, dtype: torch.dtype,
                            max_batch: int, max_query_len: int) -> int:
    """Compiles the unified kernel for every (tile, batch-lookup) variant that a serving step can
    select, on dummy one-token requests: Triton compiles on first use (about a second each), which
    would otherwise land on the first requests of each batch size and chunk length (measured on an
    H100: a cold run of the 1,024-request throughput benchmark lost a third of its speed to it).
    Returns the number of variants launched."""
    if not triton_enabled_for(k_cache):
        return 0
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    group = num_q_heads // num_kv_heads
    tiles: dict[AttnConfig, int] = {}  # tile shape -> the query length that selects it
    mql = 1
    while True:  # one representative query length per tile shape
        tiles.setdefault(attention_config(head_dim, group, mql, dtype), mql)
        if mql >= max_query_len:
            break
        mql = min(2 * mql, max_query_len)
    batches = sorted({min(b, max_batch) for b in (64 * 2**i for i in range(16)) if b // 2 < max_batch})
    device = k_cache.device
    ones = torch.ones(1, dtype=torch.float32, device=device)  # KV scales of an fp8 cache
    for cfg, mql in tiles.items():
        for b in batches:
            q = torch.zeros((b, num_q_heads, head_dim), dtype=dtype, device=device)
            paged_attention_triton(
                q, k_cache, v_cache, torch.zeros((b, 1), dtype=torch.int32, device=device),
                torch.arange(b + 1, dtype=torch.int32, device=device), torch.ones(b, dtype=torch.int32, device=device),
                1.0, mql, 1, config=cfg, k_scale=ones, v_scale=ones)
    return len(tiles) * len(batches)


def paged_attention_triton(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, scale: float, max_query_len: int,
    max_seq_len: int, *, out: Optional[torch.Tensor] = None, config: Optional[AttnConfig] = None,
    k_scale: Optional[torch.Tensor] = None, v_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Unified paged attention (any mix of prefill chunks, decode and verification).

    Same contract as paged_attention_ref. max_seq_len is unused by the kernel (KV loop bounds come
    from seq_lens on the device) and max_query_len only picks the tile shape, so any upper bound
    works, e.g. inside a captured CUDA graph. `config` overrides the tile choice (tests, tuning)."""
    num_q_heads, num_kv_heads, head_dim, page_size = _check_shapes(q, k_cache, v_cache)
    group = num_q_heads // num_kv_heads
    q = _last_dim_contiguous(q)
    k_cache, v_cache = _last_dim_contiguous(k_cache), _last_dim_contiguous(v_cache)
    block_tables = _last_dim_contiguous(block_tables)
    query_start_loc, seq_lens = query_start_loc.contiguous(), seq_lens.contiguous()
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    num_tokens, batch = q.shape[0], seq_lens.shape[0]
    cfg = config or attention_config(head_dim, group, max_query_len, q.dtype)
    if cfg.block_m < group:
        raise ValueError(f"block_m {cfg.block_m} must be >= the GQA group size {group}")
    block_q = cfg.block_m // group
    block_d = max(16, next_pow2(head_dim))
    grid = (num_tokens // block_q + batch, num_kv_heads)
    if num_tokens == 0 or batch == 0:
        return out
    k_scale, v_scale = kv_scales_or_ones(k_cache, k_scale, v_scale)
    _paged_attention_kernel[grid](
        out, q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, k_scale, v_scale,
        scale * _LOG2E, batch,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d, PAGE_SIZE=page_size,
        BLOCK_M=cfg.block_m, BLOCK_Q=block_q, BLOCK_N=cfg.block_n, BLOCK_B=batch_block(batch),
        PAD_D=block_d != head_dim, DOT_PRECISION=_dot_precision(q.dtype), KV_FP8=is_fp8(k_cache),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_launch(out),
    )
    return out


def paged_attention_decode_split_triton(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, scale: float, max_query_len: int,
    max_seq_len: int, *, num_splits: Optional[int] = None, out: Optional[torch.Tensor] = None,
    block_n: Optional[int] = None, num_stages: Optional[int] = None,
    k_scale: Optional[torch.Tensor] = None, v_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Flash-decoding for batches of short queries: decode (q_len 1) and speculative verification or
    catch-up rows (q_len <= SPLIT_MAX_QUERY_LEN, each the last q_len tokens of its sequence, causal).

    num_splits defaults to num_kv_splits(batch, max_seq_len, ...). Correctness does not depend on
    max_seq_len (partitions are sized from seq_lens on the device); it only sizes the split count.
    max_query_len must bound every row's query length (it sizes the tiles and the reduce grid)."""
    if max_query_len > SPLIT_QUERY_LEN_LIMIT:
        raise ValueError(f"the split-KV path handles queries of at most {SPLIT_QUERY_LEN_LIMIT} tokens "
                         f"(max_query_len {max_query_len})")
    block_q = next_pow2(max(1, max_query_len))
    num_q_heads, num_kv_heads, head_dim, page_size = _check_shapes(q, k_cache, v_cache)
    group = num_q_heads // num_kv_heads
    q = _last_dim_contiguous(q)
    k_cache, v_cache = _last_dim_contiguous(k_cache), _last_dim_contiguous(v_cache)
    block_tables = _last_dim_contiguous(block_tables)
    query_start_loc, seq_lens = query_start_loc.contiguous(), seq_lens.contiguous()
    num_tokens, batch = q.shape[0], seq_lens.shape[0]
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_tokens == 0 or batch == 0:
        return out
    if num_splits is None:
        num_splits = num_kv_splits(batch, max_seq_len, num_kv_heads, num_sms(q.device))
    num_splits = max(1, min(int(num_splits), SPLIT_MAX))
    fp32 = q.dtype == torch.float32
    tile_n, tile_stages = decode_tile(head_dim)
    if block_n is None:
        block_n = 16 if fp32 else tile_n
    block_d = max(16, next_pow2(head_dim))
    # Partials in fp32: [T, Hq, S, D] accumulators and [T, Hq, S, 2] (max, sum). Shapes depend on
    # Python ints only, so this allocation is legal inside CUDA graph capture.
    part_out = torch.empty((num_tokens, num_q_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
    part_ml = torch.empty((num_tokens, num_q_heads, num_splits, 2), dtype=torch.float32, device=q.device)
    k_scale, v_scale = kv_scales_or_ones(k_cache, k_scale, v_scale)
    _paged_attention_split_kernel[(batch, num_kv_heads, num_splits)](
        part_out, part_ml, q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, k_scale, v_scale,
        scale * _LOG2E,
        num_splits, q.stride(0), q.stride(1),
        part_out.stride(0), part_out.stride(1), part_out.stride(2),
        part_ml.stride(0), part_ml.stride(1), part_ml.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d, PAGE_SIZE=page_size,
        BLOCK_M=max(16, next_pow2(block_q * group)), BLOCK_N=block_n, PAD_D=block_d != head_dim,
        DOT_PRECISION=_dot_precision(q.dtype), KV_FP8=is_fp8(k_cache), BLOCK_Q=block_q,
        num_warps=4, num_stages=2 if fp32 else (num_stages or tile_stages), **pdl_launch(part_out),
    )
    _paged_attention_split_reduce_kernel[(batch, num_q_heads, max(1, max_query_len))](
        out, part_out, part_ml, query_start_loc, seq_lens, num_splits,
        out.stride(0), out.stride(1), part_out.stride(0), part_out.stride(1), part_out.stride(2),
        part_ml.stride(0), part_ml.stride(1), part_ml.stride(2),
        BLOCK_S=max(2, next_pow2(num_splits)), HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_N=block_n, num_warps=4 if head_dim >= 128 else 2, **pdl_launch(out),
    )
    return out


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, scale: float, max_query_len: int,
                    max_seq_len: int, k_scale: Optional[torch.Tensor] = None,
                    v_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Dispatcher: Triton on CUDA (split-KV for batches of queries of at most SPLIT_MAX_QUERY_LEN tokens
    when num_kv_splits says so: decode, speculative verification and catch-up), the
    torch reference elsewhere or when the backend is forced to "torch". Decides from Python ints
    and shapes only, never from device values."""
    if not triton_enabled_for(q):
        return paged_attention_ref(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale,
                                   max_query_len, max_seq_len, k_scale, v_scale)
    if max_query_len <= SPLIT_MAX_QUERY_LEN:
        splits = num_kv_splits(seq_lens.shape[0], max_seq_len, k_cache.shape[2], num_sms(q.device))
        if splits > 1:
            return paged_attention_decode_split_triton(q, k_cache, v_cache, block_tables, query_start_loc,
                                                       seq_lens, scale, max_query_len, max_seq_len,
                                                       num_splits=splits, k_scale=k_scale, v_scale=v_scale)
    return paged_attention_triton(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale,
                                  max_query_len, max_seq_len, k_scale=k_scale, v_scale=v_scale)
