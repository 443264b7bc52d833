"""A step's flat model inputs, built on the host from its scheduled rows (DESIGN.md "The step contract"):
input ids, positions, KV slots, query start offsets, context lengths, block tables, the logits rows to
sample, and the LoRA slot of every token. Packed into one int64 and one int32 buffer so that a step
costs two host-to-device copies."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import numpy as np
import torch

from agentserve.lora.layers import token_slot_indices
from agentserve.lora.manager import MultiLoRAManager
from agentserve.model.attention import ForwardMetadata
from agentserve.request import Request
from agentserve.worker.launched_step import LaunchedStep


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass
class ScheduledChunk:
    """One row of a step (DESIGN.md "The step contract"). The row computes `num_tokens` new tokens:
    the request's known tokens from num_computed_tokens on, then its `spec_token_ids`. It samples at
    its last `num_sampled` positions: 0 for a middle prefill chunk, 1 for a decode or the last
    prefill chunk, k + 1 for a row verifying k speculative tokens."""
    request: Request
    num_tokens: int
    num_sampled: int
    spec_token_ids: list[int] = field(default_factory=list)


class StepInputs(NamedTuple):
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: ForwardMetadata
    logits_indices: torch.Tensor  # the flat positions whose logits are sampled, row by row


def _host_buffer(device: torch.device, n: int, dtype: torch.dtype) -> tuple[np.ndarray, torch.Tensor]:
    # Pinned memory on CUDA, filled through numpy: one asynchronous copy per dtype and step. The
    # caching host allocator keeps the block until that copy has run, so a step prepared while
    # the device still runs the previous one cannot overwrite inputs not yet copied.
    t = torch.empty(n, dtype=dtype, pin_memory=device.type == "cuda")
    return t.numpy(), t


def build_step_inputs(chunks: list[ScheduledChunk], block_size: int, device: torch.device,
                      lora_manager: Optional[MultiLoRAManager], prev: Optional[LaunchedStep] = None) -> StepInputs:
    """Flat inputs of a step on `device`. A decode whose input token was sampled by `prev` (still in
    flight under async scheduling) reads it from prev.sampled on the device."""
    bs = block_size
    num_tokens = [c.num_tokens for c in chunks]
    total = sum(num_tokens)
    b = len(chunks)
    num_sample = sum(c.num_sampled for c in chunks)
    width = max(1, max(len(c.request.block_table) for c in chunks))
    # int64: input ids, positions, slots, logits indices, then gather (dst, src) pairs, at most one
    # per decode; int32: query start offsets, context lengths, block tables.
    # Every segment starts 16-byte aligned: Triton specialises kernels on pointer alignment, so
    # segments at odd offsets would compile extra kernel variants mid-serving (and lose vector loads).
    a64 = _round_up(total, 2)  # 2 int64 = 16 bytes
    o_logits = 3 * a64
    o_gather = o_logits + _round_up(num_sample, 2)
    o_seq = _round_up(b + 1, 4)  # 4 int32 = 16 bytes
    o_tab = o_seq + _round_up(b, 4)
    h64, t64 = _host_buffer(device, o_gather + 2 * b, torch.int64)
    h32, t32 = _host_buffer(device, o_tab + b * width, torch.int32)
    input_ids, positions, slots = h64[:total], h64[a64:a64 + total], h64[2 * a64:2 * a64 + total]
    logits_indices = h64[o_logits:o_logits + num_sample]
    query_start, seq_lens = h32[:b + 1], h32[o_seq:o_seq + b]
    tables = h32[o_tab:].reshape(b, width)
    # All block tables in one numpy call: the flattened pages land where column < table length.
    table_lists = [c.request.block_table for c in chunks]
    table_lens = np.fromiter(map(len, table_lists), dtype=np.int64, count=b)
    tables.fill(0)
    tables[np.arange(width)[None, :] < table_lens[:, None]] = list(itertools.chain.from_iterable(table_lists))
    # Per-row columns from numpy: starts, context lengths, query offsets, and for decode rows (one
    # token: the common case at a large batch) their positions and slots, without a per-row numpy call.
    starts = np.fromiter((c.request.num_computed_tokens for c in chunks), dtype=np.int64, count=b)
    counts = np.array(num_tokens, dtype=np.int64)
    ends = np.cumsum(counts)  # each row's end in the flat tokens
    query_start[0] = 0
    query_start[1:] = ends
    seq_lens[:] = starts + counts
    decode = counts == 1
    dec_rows = np.flatnonzero(decode)
    dec_lo, dec_pos = ends[dec_rows] - 1, starts[dec_rows]
    positions[dec_lo] = dec_pos
    slots[dec_lo] = tables[dec_rows, dec_pos // bs].astype(np.int64) * bs + dec_pos % bs
    dec_ids: list[int] = []
    gathered: list[int] = []  # decode rows (their index among dec_rows) whose input is gathered
    gather_src: list[int] = []
    for k, i in enumerate(dec_rows.tolist()):
        req = chunks[i].request
        start, tokens = req.num_computed_tokens, req.all_token_ids
        if start < len(tokens):
            dec_ids.append(tokens[start])
        else:  # sampled by the step in flight: filled on the device below
            assert prev is not None, f"{req.request_id}: input token {start} not known"
            dec_ids.append(0)
            gathered.append(k)
            gather_src.append(prev.rows[req.request_id])
    input_ids[dec_lo] = dec_ids
    gather_dst = dec_lo[gathered]
    for i in np.flatnonzero(~decode).tolist():  # prefill chunks and verification rows
        chunk = chunks[i]
        req = chunk.request
        n = chunk.num_tokens
        start = req.num_computed_tokens
        lo, end = int(ends[i]) - n, start + n
        spec = chunk.spec_token_ids
        known = end - len(spec)
        assert known <= len(req.all_token_ids), f"{req.request_id}: chunk past the known tokens"
        pos = np.arange(start, end)
        input_ids[lo:lo + n] = req.all_token_ids[start:known] + spec
        positions[lo:lo + n] = pos
        slots[lo:lo + n] = tables[i, pos // bs].astype(np.int64) * bs + pos % bs
    # Logits rows: each sampling row's last num_sampled positions, in row order.
    sample_counts = np.fromiter((c.num_sampled for c in chunks), dtype=np.int64, count=b)
    if num_sample == int(np.count_nonzero(sample_counts)):  # every sampling row samples once
        logits_indices[:] = ends[sample_counts > 0] - 1
    else:
        first = np.repeat(ends - sample_counts, sample_counts)  # each sampled position's row's first
        offset = np.arange(num_sample) - np.repeat(np.cumsum(sample_counts) - sample_counts, sample_counts)
        logits_indices[:] = first + offset
    g = len(gather_dst)
    base = o_gather
    h64[base:base + g] = gather_dst
    h64[base + g:base + 2 * g] = gather_src
    if device.type == "cuda":
        d64 = t64[:base + 2 * g].to(device, non_blocking=True)
        d32 = t32.to(device, non_blocking=True)
    else:
        d64, d32 = t64, t32
    ids_d = d64[:total]
    if g:
        assert prev is not None and prev.sampled is not None
        ids_d[d64[base:base + g]] = prev.sampled[d64[base + g:base + 2 * g]]
    meta = ForwardMetadata(
        slot_mapping=d64[2 * a64:2 * a64 + total], block_tables=d32[o_tab:].view(b, width),
        query_start_loc=d32[:b + 1], seq_lens=d32[o_seq:o_seq + b],
        max_query_len=max(num_tokens), max_seq_len=int(seq_lens.max()),
        lora_slot_indices=token_slot_indices(lora_manager, [c.request.lora_key for c in chunks],
                                             num_tokens, device))
    return StepInputs(ids_d, d64[a64:a64 + total], meta, d64[o_logits:o_logits + num_sample])
