"""The inputs of a draft proposal's forwards, planned up front and copied to the device at once.

A proposal runs a catch-up (one token per request after most verification steps; more when every
draft was accepted, or after a prefill) and then up to k - 1 decode steps, step s feeding each row's
draft d_s at position n - 1 + s. Without grammars the rows of every step are known before the first
draft is sampled (row i runs while s < k_i), and so are their positions, KV slots and context
lengths; only the input ids come from the previous step's samples, on the device. Built per forward,
these were one host build and one host-to-device copy each, plus one for the block tables; planned,
they are one build and one copy per proposal, which the device would otherwise idle through (a
speculative step runs in the synchronous order). With grammars (a row ends where its matcher
ends) only the catch-up and the block tables are planned; the steps build their inputs as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from agentserve.request import Request
from agentserve.spec.draft_inputs import (DraftRun, PaddedInputs, block_tables_of, padded_host_parts,
                                          to_device_packed)


@dataclass
class DecodeStepInputs:
    """One token per row of `rows` (indices into the proposal's requests)."""
    rows: list[int]
    ids: Optional[torch.Tensor]  # host-known ids (a catch-up), else None: the previous step's samples
    positions: torch.Tensor
    slots: torch.Tensor
    seq_lens: torch.Tensor
    max_seq_len: int
    # Which of the previous step's rows go on (None: all of them), and the rows' block tables (None:
    # every request's, the proposal's `tables`), as device index tensors.
    keep_index: Optional[torch.Tensor] = None
    row_index: Optional[torch.Tensor] = None


@dataclass
class ProposalPlan:
    host_tables: np.ndarray               # [R, width] int64 on the host
    tables: torch.Tensor                  # the same, int32 on the device
    catch_up_padded: Optional[PaddedInputs]  # the catch-up as one padded-graph replay
    catch_up_decode: Optional[DecodeStepInputs]  # the catch-up as one decode step (one token per request)
    steps: dict[int, DecodeStepInputs]   # decode step s >= 1 -> its inputs (planned steps only)

    def step(self, step: int, rows: list[int]) -> Optional[DecodeStepInputs]:
        """The planned inputs of `step` if the rows that go on are the planned ones."""
        planned = self.steps.get(step)
        return planned if planned is not None and planned.rows == rows else None


def _decode_parts(host_tables: np.ndarray, rows: np.ndarray, positions: np.ndarray,
                  block_size: int) -> list[np.ndarray]:
    slots = host_tables[rows, positions // block_size] * block_size + positions % block_size
    return [positions, slots, positions + 1]


def plan_proposal(requests: list[Request], starts: list[int], num_tokens: list[int], plan_steps: bool,
                  padded_q: Optional[int], block_size: int, max_model_len: int,
                  device: torch.device) -> ProposalPlan:
    """`starts[i]`: the first position request i's catch-up computes; `num_tokens[i]`: its k_i;
    `plan_steps`: whether the decode steps' rows are known now (no grammar); `padded_q`: the catch-up
    runs as a padded replay of q tokens per row (None: it does not)."""
    host_tables = block_tables_of([DraftRun([], 0, r.block_table) for r in requests])
    num_rows = len(requests)
    last = np.fromiter((r.num_tokens - 1 for r in requests), dtype=np.int64, count=num_rows)
    parts: list[np.ndarray] = [host_tables]
    padded_at = decode_at = -1
    if padded_q is not None:
        runs = [DraftRun(r.all_token_ids[s:r.num_tokens], s, r.block_table) for r, s in zip(requests, starts)]
        padded_at = len(parts)
        host = padded_host_parts(runs, padded_q, block_size, max_model_len)
        parts += host[:3] + host[4:]  # its block tables are the proposal's
    elif all(s == p for s, p in zip(starts, last)):
        decode_at = len(parts)
        host_ids = np.fromiter((r.all_token_ids[r.num_tokens - 1] for r in requests), dtype=np.int64,
                               count=num_rows)
        parts += [host_ids, *_decode_parts(host_tables, np.arange(num_rows), last, block_size)]
    k = np.asarray(num_tokens, dtype=np.int64)
    # Decode step s >= 1 runs the rows with k_i > s, at positions n_i - 1 + s: every planned step's
    # positions, slots and context lengths in one numpy pass, step after step.
    num_steps = int(k.max()) - 1 if plan_steps and num_rows else 0
    step_of, row_of = np.nonzero(k[None, :] > np.arange(1, num_steps + 1)[:, None])
    steps_at = len(parts)
    parts += _decode_parts(host_tables, row_of, last[row_of] + step_of + 1, block_size)
    bounds = np.searchsorted(step_of, np.arange(num_steps + 1))
    planned: list[tuple[int, np.ndarray, int, bool, bool]] = []  # step, rows, its index parts
    previous = np.arange(num_rows)
    for step in range(1, num_steps + 1):
        rows = row_of[bounds[step - 1]:bounds[step]]
        keep, index = rows.size < previous.size, rows.size < num_rows
        planned.append((step, rows, len(parts), keep, index))
        if keep:
            parts.append(np.flatnonzero(k[previous] > step))
        if index:
            parts.append(rows)
        previous = rows
    d = to_device_packed(parts, device)
    tables = d[0].to(torch.int32).view(host_tables.shape)
    padded = None
    if padded_at >= 0:
        ids, positions, slots, seq_lens, real, last_index = d[padded_at:padded_at + 6]
        padded = PaddedInputs(input_ids=ids, positions=positions, slot_mapping=slots, block_tables=tables,
                              seq_lens=seq_lens.to(torch.int32), real_index=real, last_index=last_index)
    catch_up = None
    if decode_at >= 0:
        ids, positions, slots, seq_lens = d[decode_at:decode_at + 4]
        catch_up = DecodeStepInputs(list(range(num_rows)), ids, positions, slots, seq_lens, int(last.max()) + 1)
    steps = {}
    positions, slots, seq_lens = d[steps_at:steps_at + 3]
    for step, rows, at, keep, index in planned:
        lo, hi = int(bounds[step - 1]), int(bounds[step])
        extra = iter(d[at:at + keep + index])
        steps[step] = DecodeStepInputs(rows.tolist(), None, positions[lo:hi], slots[lo:hi], seq_lens[lo:hi],
                                       int(last[rows].max()) + step + 1,
                                       keep_index=next(extra) if keep else None,
                                       row_index=next(extra) if index else None)
    return ProposalPlan(host_tables, tables, padded, catch_up, steps)
