"""Flat forward inputs for the draft model: runs of tokens at given positions over the requests'
block tables (the same page ids as the target's; the draft writes its own KV layers there)."""

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


def build_draft_inputs(runs: list[DraftRun], block_size: int, device: torch.device
                       ) -> tuple[torch.Tensor, torch.Tensor, ForwardMetadata, torch.Tensor]:
    """(input ids, positions, metadata, index of each run's last token in the flat batch)."""
    num_runs = len(runs)
    lengths = np.fromiter((len(r.tokens) for r in runs), dtype=np.int64, count=num_runs)
    total = int(lengths.sum())
    width = max(1, max(len(r.block_table) for r in runs))
    tables = np.zeros((num_runs, width), dtype=np.int32)
    for i, run in enumerate(runs):
        tables[i, :len(run.block_table)] = run.block_table
    starts = np.fromiter((r.start for r in runs), dtype=np.int64, count=num_runs)
    row_of_token = np.repeat(np.arange(num_runs), lengths)
    cu = np.concatenate([[0], np.cumsum(lengths)])
    positions = starts[row_of_token] + np.arange(total) - cu[:-1][row_of_token]
    slots = tables[row_of_token, positions // block_size].astype(np.int64) * block_size + positions % block_size
    ids = np.fromiter((t for r in runs for t in r.tokens), dtype=np.int64, count=total)
    seq_lens = (starts + lengths).astype(np.int32)

    def to_device(a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(a))
        if device.type == "cuda":
            # Pinned + non_blocking: a pageable copy would make the host wait for queued work.
            return t.pin_memory().to(device, non_blocking=True)
        return t

    meta = ForwardMetadata(slot_mapping=to_device(slots), block_tables=to_device(tables),
                           query_start_loc=to_device(cu.astype(np.int32)), seq_lens=to_device(seq_lens),
                           max_query_len=int(lengths.max()), max_seq_len=int(seq_lens.max()))
    return to_device(ids), to_device(positions), meta, to_device(cu[1:] - 1)
