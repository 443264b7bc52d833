"""Where a step's speculative rows sit in the flat token batch and in the sampled logits.

Row i of a step (a request that samples) proposes k_i draft tokens (k_i = 0 for a plain decode or a
last prefill chunk). Its last k_i + 1 scheduled tokens are the last accepted token followed by the
drafts, and the target scores all k_i + 1 of them: position j < k_i checks draft j, position k_i gives
the bonus token. The sampled logits are laid out row after row, k_i + 1 rows each:

    logits row  s_i + j   (s_i = sum over earlier rows of k + 1)   scores position j of row i

Names follow vLLM V1's `SpecDecodeMetadata`; `cu_num_draft_tokens` is its inclusive cumulative sum.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch


@dataclass
class SpecDecodeMetadata:
    draft_token_ids: torch.Tensor        # [T] int64, every row's drafts back to back (T = sum k_i)
    num_draft_tokens: list[int]          # [N] k_i on the host (sizes and per-row loops never sync)
    num_draft_tokens_tensor: torch.Tensor  # [N] int64, the same on the device
    cu_num_draft_tokens: torch.Tensor    # [N] int32, inclusive cumulative sum of num_draft_tokens
    target_logits_indices: torch.Tensor  # [T] int64, sampled-logits row scoring each draft token
    bonus_logits_indices: torch.Tensor   # [N] int64, sampled-logits row of each row's last position
    logits_indices: torch.Tensor         # [T + N] int64, flat token indices whose hidden states get logits
    # Per sampled-logits row: which request row it belongs to and its position j in that row.
    logits_row_ids: torch.Tensor         # [T + N] int64
    logits_positions: torch.Tensor       # [T + N] int64
    first_logits_indices: torch.Tensor   # [N] int64, s_i
    max_spec_len: int                    # max k_i (0 when nothing is speculated)
    # Per draft token: its request row and its position j in that row (logits_row_ids and
    # logits_positions at target_logits_indices, computed on the host with the rest).
    draft_row_ids: torch.Tensor          # [T] int64
    draft_positions: torch.Tensor        # [T] int64

    @property
    def num_rows(self) -> int:
        return len(self.num_draft_tokens)

    @property
    def num_logits(self) -> int:
        return int(self.logits_indices.shape[0])

    @property
    def total_num_draft_tokens(self) -> int:
        return int(self.draft_token_ids.shape[0])

    @classmethod
    def build(cls, draft_token_ids: Sequence[Sequence[int]], device: torch.device,
              query_end_loc: Optional[Sequence[int]] = None) -> "SpecDecodeMetadata":
        """From each sampling row's drafts (empty for a row that does not speculate).

        `query_end_loc[i]` is one past row i's last token in the flat token batch (the runner's
        cumulative scheduled-token count); by default each row schedules exactly k_i + 1 tokens, as a
        pure verification step does. Everything is computed on the host and copied in one transfer.
        """
        parts, num_draft = cls.host_parts(draft_token_ids, query_end_loc)
        host = torch.empty(sum(p.size for p in parts), dtype=torch.int64, pin_memory=device.type == "cuda")
        # Filled in place in pinned memory (on CUDA): the copy is asynchronous, with no pageable
        # intermediate (a pageable copy would make the host wait for the running forward).
        np.concatenate(parts, out=host.numpy())
        return cls.from_device(list(torch.split(host.to(device, non_blocking=True), [p.size for p in parts])),
                               num_draft)

    @staticmethod
    def host_parts(draft_token_ids: Sequence[Sequence[int]],
                   query_end_loc: Optional[Sequence[int]] = None) -> tuple[list[np.ndarray], list[int]]:
        """The fields' host arrays (int64) in from_device's order, and k_i per row: callers may send
        them in a copy of their own (the verification step packs them with its inputs)."""
        num_rows = len(draft_token_ids)
        num_draft = np.fromiter((len(d) for d in draft_token_ids), dtype=np.int64, count=num_rows)
        num_sampled = num_draft + 1
        cu_sampled = np.cumsum(num_sampled)
        first = cu_sampled - num_sampled  # s_i
        total_logits = int(cu_sampled[-1]) if num_rows else 0
        if query_end_loc is None:
            ends = cu_sampled
        else:
            ends = np.asarray(query_end_loc, dtype=np.int64)
            if ends.shape != (num_rows,):
                raise ValueError(f"query_end_loc has {ends.shape[0]} entries for {num_rows} rows")
            starts = np.concatenate([[0], ends[:-1]])
            if np.any(ends - starts < num_sampled):
                raise ValueError("a row schedules fewer tokens than its drafts + 1")

        row_ids = np.repeat(np.arange(num_rows, dtype=np.int64), num_sampled)
        positions = np.arange(total_logits, dtype=np.int64) - np.repeat(first, num_sampled)
        # The row's last k_i + 1 scheduled tokens: end - (k_i + 1) + j.
        logits_indices = np.repeat(ends - num_sampled, num_sampled) + positions
        is_draft_position = positions < np.repeat(num_draft, num_sampled)
        target_logits_indices = np.flatnonzero(is_draft_position)
        bonus_logits_indices = cu_sampled - 1
        flat_drafts = np.fromiter((t for d in draft_token_ids for t in d), dtype=np.int64,
                                  count=int(num_draft.sum()))

        parts = [flat_drafts, target_logits_indices, bonus_logits_indices, logits_indices, row_ids, positions,
                 first, np.cumsum(num_draft), num_draft, row_ids[target_logits_indices],
                 positions[target_logits_indices]]
        return [p.astype(np.int64, copy=False) for p in parts], num_draft.tolist()

    @classmethod
    def from_device(cls, views: list[torch.Tensor], num_draft_tokens: list[int]) -> "SpecDecodeMetadata":
        """From the device copies of host_parts' arrays (views into one buffer)."""
        return cls(
            draft_token_ids=views[0], num_draft_tokens=num_draft_tokens, num_draft_tokens_tensor=views[8],
            cu_num_draft_tokens=views[7].to(torch.int32), target_logits_indices=views[1],
            bonus_logits_indices=views[2], logits_indices=views[3], logits_row_ids=views[4],
            logits_positions=views[5], first_logits_indices=views[6],
            max_spec_len=max(num_draft_tokens, default=0), draft_row_ids=views[9], draft_positions=views[10])
