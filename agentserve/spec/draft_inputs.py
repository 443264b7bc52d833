"""Flat forward inputs for runs of tokens at given positions over the requests' block tables: the draft
model's forwards (the same page ids as the target's; the draft writes its own KV layers there) and the
padded layout of verification and catch-up CUDA graphs (worker/verify_graphs.py).

Each builder fills one host buffer and makes one copy to the device (pinned, asynchronous): the
device is idle while the host prepares a speculative step, so per-tensor copies would add up."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from agentserve.model.attention import ForwardMetadata


@dataclass
class DraftRun:
    """`tokens` computed at positions start .. start + len(tokens) - 1 of a request."""
    tokens: list[int]
    start: int
    block_table: list[int]


def to_device_packed(parts: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """The parts (any integer dtype) as int64 device tensors [part.size], from one host buffer and one
    copy. On CUDA the buffer is allocated pinned and filled in place: no pageable intermediate and
    second memcpy (pin_memory() of a numpy-built tensor), and the copy is asynchronous. The caching
    host allocator keeps the block until the copy has run."""
    sizes = [p.size for p in parts]
    host = torch.empty(sum(sizes), dtype=torch.int64, pin_memory=device.type == "cuda")
    np.concatenate([p.reshape(-1) for p in parts], out=host.numpy())
    flat = host.to(device, non_blocking=True)
    return list(torch.split(flat, sizes))


def block_tables_of(runs: list[DraftRun]) -> np.ndarray:
    """The runs' block tables as one int64 array (zero-padded to the widest)."""
    return _tables(runs)


def build_decode_inputs(tokens: list[int], positions: list[int], tables: np.ndarray, block_size: int,
                        device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One token per row at `positions` over host `tables` [R, width]: (ids, positions, slots, context
    lengths), int64, in one copy. A draft's decode steps reuse the proposal's device block tables."""
    pos = np.asarray(positions, dtype=np.int64)
    slots = tables[np.arange(len(positions)), pos // block_size] * block_size + pos % block_size
    ids, d_pos, d_slots, seq_lens = to_device_packed([np.asarray(tokens, dtype=np.int64), pos, slots, pos + 1], device)
    return ids, d_pos, d_slots, seq_lens


def _tables(runs: list[DraftRun]) -> np.ndarray:
    width = max(1, max(len(r.block_table) for r in runs))
    tables = np.zeros((len(runs), width), dtype=np.int64)
    for i, run in enumerate(runs):
        tables[i, :len(run.block_table)] = run.block_table
    return tables


def build_draft_inputs(runs: list[DraftRun], block_size: int, device: torch.device
                       ) -> tuple[torch.Tensor, torch.Tensor, ForwardMetadata, torch.Tensor]:
    """(input ids, positions, metadata, index of each run's last token in the flat batch)."""
    num_runs = len(runs)
    lengths = np.fromiter((len(r.tokens) for r in runs), dtype=np.int64, count=num_runs)
    total = int(lengths.sum())
    tables = _tables(runs)
    starts = np.fromiter((r.start for r in runs), dtype=np.int64, count=num_runs)
    row_of_token = np.repeat(np.arange(num_runs), lengths)
    cu = np.concatenate([[0], np.cumsum(lengths)])
    positions = starts[row_of_token] + np.arange(total) - cu[:-1][row_of_token]
    slots = tables[row_of_token, positions // block_size] * block_size + positions % block_size
    ids = np.fromiter((t for r in runs for t in r.tokens), dtype=np.int64, count=total)
    seq_lens = starts + lengths
    d_ids, d_pos, d_slots, d_tables, d_cu, d_seq, d_last = to_device_packed(
        [ids, positions, slots, tables, cu, seq_lens, cu[1:] - 1], device)
    meta = ForwardMetadata(slot_mapping=d_slots, block_tables=d_tables.to(torch.int32).view(tables.shape),
                           query_start_loc=d_cu.to(torch.int32), seq_lens=d_seq.to(torch.int32),
                           max_query_len=int(lengths.max()), max_seq_len=int(seq_lens.max()))
    return d_ids, d_pos, meta, d_last


@dataclass
class PaddedInputs:
    """Runs laid out q tokens each (padding: token 0, slot -1, positions continuing past the run's,
    clamped to the context; context length start + q), for a graph captured at that q."""
    input_ids: torch.Tensor    # [R * q]
    positions: torch.Tensor    # [R * q]
    slot_mapping: torch.Tensor  # [R * q]
    block_tables: torch.Tensor  # [R, width] int32
    seq_lens: torch.Tensor     # [R] int32
    real_index: torch.Tensor   # flat indices of every run's real tokens, run after run
    last_index: torch.Tensor   # [R] flat index of each run's last real token


def build_padded_inputs(runs: list[DraftRun], q: int, block_size: int, max_model_len: int,
                        device: torch.device) -> PaddedInputs:
    parts = padded_host_parts(runs, q, block_size, max_model_len)
    return padded_from_device(to_device_packed(parts, device), parts[3].shape)


def padded_host_parts(runs: list[DraftRun], q: int, block_size: int, max_model_len: int) -> list[np.ndarray]:
    """PaddedInputs' fields on the host, in its order (callers may pack more parts into the same copy)."""
    num_runs = len(runs)
    ids = np.zeros((num_runs, q), dtype=np.int64)
    slots = np.full((num_runs, q), -1, dtype=np.int64)
    tables = _tables(runs)
    starts = np.fromiter((r.start for r in runs), dtype=np.int64, count=num_runs)
    positions = np.minimum(starts[:, None] + np.arange(q)[None, :], max_model_len - 1)
    real: list[int] = []
    last = np.empty(num_runs, dtype=np.int64)
    for i, run in enumerate(runs):
        n = len(run.tokens)
        ids[i, :n] = run.tokens
        pos = positions[i, :n]
        slots[i, :n] = tables[i, pos // block_size] * block_size + pos % block_size
        real.extend(range(i * q, i * q + n))
        last[i] = i * q + n - 1
    return [ids, positions, slots, tables, starts + q, np.asarray(real, dtype=np.int64), last]


def padded_from_device(d: list[torch.Tensor], table_shape: tuple[int, ...]) -> PaddedInputs:
    """PaddedInputs from the device views of padded_host_parts' arrays, in that order."""
    return PaddedInputs(input_ids=d[0], positions=d[1], slot_mapping=d[2],
                        block_tables=d[3].to(torch.int32).view(table_shape), seq_lens=d[4].to(torch.int32),
                        real_index=d[5], last_index=d[6])
