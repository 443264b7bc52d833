"""A draft proposal queued on the device right behind the verification step it continues from.

In the synchronous order of a speculative step the device idles from the end of a verification until
the host has read its tokens, appended them, planned the next proposal and launched the draft's
catch-up (~1.3 ms of a ~8.5 ms iteration on the H200 at batch 1, k = 4). Everything the next proposal
needs is on the device as soon as the verification's sampling is queued: per row, the number of
accepted drafts a and the emitted tokens; and on the host, known at launch, the row's first verified
position P, the token verified there and the block table. So the proposal is queued right then:

- catch-up: the draft computes [x_a, t] at positions P + a, P + a + 1, where t is the verification's
  new token (recovered or bonus) and x_a the last accepted draft (the verified token itself when
  a = 0). When a < k the draft KV of x_a is already written; recomputing it rewrites the same values
  and gives every row the same shape (one padded replay at q = 2). Its logits at t give d_1.
- k - 1 decode steps feed d_s at position P + a + 1 + s.
KV slots come from the row's block table on the device; the pages for positions up to P + 2k were
reserved with the proposal before the verification (engine/speculation.py).

The host reads the verification's tokens while the device runs these forwards, then adopts the
drafts (left on the device: spec/device_drafts.py) for each row whose state is the one the
continuation assumed: running, due for a decode, P + a + 2 known tokens with 0 <= a <= its k. A row
that is not adopted (it finished, or left the batch, or the step does not speculate) cost only device
work: what the continuation wrote lies at positions >= P + a, the values at P + a and P + a + 1 are
the sequence's own tokens, and a proposal from the host computes from min(num_draft_computed_tokens,
num_computed_tokens) as before. Writes into pages freed meanwhile come first in stream order, so the
next owner's writes replace them. The target's KV is never written here: outputs stay exact whatever
happens to a continuation.

Rows with a grammar (their proposals need the matcher on the host) and seeded random rows (whether a
continuation is adopted depends on the rest of the batch; their draft stream must not) are not
continued; greedy and unseeded random rows are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from agentserve.request import Request
from agentserve.spec.draft import DraftModel
from agentserve.spec.draft_inputs import DraftRun, PaddedInputs, block_tables_of, to_device_packed

CATCH_UP_TOKENS = 2  # [x_a, t] per row


def can_continue(request: Request) -> bool:
    """Whether a row's next proposal may be queued before the host has its verified tokens."""
    params = request.sampling_params
    return request.grammar is None and not (params.temperature > 0 and params.seed is not None)


@dataclass
class PendingProposal:
    """Drafts queued on the device for the step after a verification, not yet adopted."""
    requests: list[Request]
    bases: list[int]         # per row: P, the position of the token the verification started from
    verified: list[int]      # per row: the drafts that verification scored (a <= this)
    num_tokens: int          # k drafts per row
    drafts: torch.Tensor     # [R, k] int64 on the device
    probs: list[Optional[torch.Tensor]]  # per draft step: q [R, V] (None when every row is greedy)

    def __post_init__(self) -> None:
        self._row_of = {id(r): row for row, r in enumerate(self.requests)}

    def take(self, request: Request, want: int) -> Optional[tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """(up to `want` drafts on the device, their q or None) if the continuation assumed the
        request's present state, else None."""
        row = self._row_of.get(id(request))
        if row is None or request.is_finished or request.num_computed_tokens != request.num_tokens - 1:
            return None
        accepted = request.num_tokens - 2 - self.bases[row]
        if not 0 <= accepted <= self.verified[row]:
            return None
        m = min(want, self.num_tokens)
        probs = None
        if request.sampling_params.temperature > 0 and self.probs[0] is not None:
            probs = torch.stack([q[row] for q in self.probs[:m] if q is not None])
        return self.drafts[row, :m], probs


def _slots(tables: torch.Tensor, num_pages: torch.Tensor, positions: torch.Tensor, block_size: int,
           max_model_len: int) -> torch.Tensor:
    """KV slots of `positions` [R, m] through the rows' tables; -1 (no write) past a row's pages or the
    model's length (the table is zero-padded: page 0 belongs to someone else)."""
    page = positions // block_size
    valid = (page < num_pages[:, None]) & (positions < max_model_len)
    blocks = tables.gather(1, page.clamp(max=tables.shape[1] - 1))
    return torch.where(valid, blocks * block_size + positions % block_size, torch.full_like(positions, -1))


def continuation_inputs(accepted: torch.Tensor, emitted: torch.Tensor, last: torch.Tensor, base: torch.Tensor,
                        pages: torch.Tensor, tables: torch.Tensor, steps: torch.Tensor, block_size: int,
                        max_model_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every forward's inputs of a continuation at once, from per-row device tensors: the verification's
    accepted count a and emitted tokens [R, w], the token before P, P, the row's page count and block
    table [R, width] (int64), and steps = arange(k + 1). Returns (ids [R, 2]: x_a and t; positions, slots
    and context lengths (int32), each [k + 1, R]: row 0-1 the catch-up's x_a and t, row 1 + s decode step
    s, feeding d_s). One row per forward, so each step reads a contiguous row: a few small kernels per
    proposal instead of a few per forward (they queue behind the verification on the device). A row never
    attends past its own pages (a row near max_tokens reserved fewer: what it would read there is not its
    own, and what it writes there is dropped); a row without pages (a graph's padding) reads one key."""
    new_token = emitted.gather(1, accepted[:, None]).squeeze(1)
    last_draft = emitted.gather(1, (accepted - 1).clamp(min=0)[:, None]).squeeze(1)
    ids = torch.stack([torch.where(accepted > 0, last_draft, last), new_token], dim=1)
    positions = (base + accepted)[:, None] + steps[None, :]  # P + a + [0, k]
    reach = torch.clamp(pages * block_size, max=max_model_len)
    slots = _slots(tables, pages, positions, block_size, max_model_len).t().contiguous()
    seq_lens = torch.minimum(positions + 1, reach[:, None]).clamp(min=1).t().to(torch.int32).contiguous()
    return ids, positions.clamp(max=max_model_len - 1).t().contiguous(), slots, seq_lens


@torch.inference_mode()
def continue_proposal(draft: DraftModel, requests: list[Request], rows: list[int], verified: list[int],
                      num_tokens: int, emitted: torch.Tensor, num_accepted: torch.Tensor) -> PendingProposal:
    """Queues k = num_tokens drafts for each of `requests`, continuing from the verification whose
    rejection-sampler output is `emitted` [N, w] / `num_accepted` [N]; `rows[i]`: request i's row
    there, `verified[i]`: the drafts it scored. Called right after that step's launch (the requests'
    tokens are the ones it verified from); nothing here waits for the device."""
    block_size, max_len, device = draft.block_size, draft.max_model_len, draft.device
    count = len(requests)
    bases = [r.num_tokens - 1 for r in requests]
    # The furthest position + 1 any row reaches (sizes the eager kernels' work, picks a graph's bucket).
    width = max(1, max(len(r.block_table) for r in requests))
    bound = min(max(bases) + 2 * num_tokens + 1, max_len, width * block_size)
    graphs = draft.continuation_graphs
    if graphs is not None and all(r.sampling_params.temperature == 0 for r in requests):
        drafts = graphs.run(rows, bases, [r.all_token_ids[-1] for r in requests], [r.block_table for r in requests],
                            num_tokens, emitted, num_accepted, bound)
        if drafts is not None:  # one replay (worker/continuation_graphs.py); else the eager path below
            return PendingProposal(requests, bases, verified, num_tokens, drafts, [None] * num_tokens)
    tables = block_tables_of([DraftRun([], 0, r.block_table) for r in requests])
    d_rows, d_base, d_last, d_pages, d_tables = to_device_packed(
        [np.asarray(rows, dtype=np.int64), np.asarray(bases, dtype=np.int64),
         np.fromiter((r.all_token_ids[-1] for r in requests), dtype=np.int64, count=count),
         np.fromiter((len(r.block_table) for r in requests), dtype=np.int64, count=count), tables], device)
    tables_i64 = d_tables.view(tables.shape)
    tables_i32 = tables_i64.to(torch.int32)
    ids, positions, slots, seq_lens = continuation_inputs(
        num_accepted.index_select(0, d_rows), emitted.index_select(0, d_rows), d_last, d_base, d_pages, tables_i64,
        torch.arange(num_tokens + 1, device=device), block_size, max_len)
    last_index = torch.arange(count, device=device) * CATCH_UP_TOKENS + CATCH_UP_TOKENS - 1
    padded = PaddedInputs(
        input_ids=ids.reshape(-1), positions=positions[:CATCH_UP_TOKENS].t().reshape(-1),
        slot_mapping=slots[:CATCH_UP_TOKENS].t().reshape(-1), block_tables=tables_i32,
        seq_lens=seq_lens[CATCH_UP_TOKENS - 1],
        real_index=torch.arange(count * CATCH_UP_TOKENS, device=device), last_index=last_index)
    hidden = draft.forward_padded(padded, CATCH_UP_TOKENS, bound)
    logits = draft.model.compute_logits(hidden.index_select(0, last_index)).float()
    temps = [r.sampling_params.temperature for r in requests]
    tokens, q = draft.sample(logits, requests, temps, None)
    steps, probs = [tokens], [q]
    for step in range(1, num_tokens):
        at = CATCH_UP_TOKENS - 1 + step  # d_step at P + a + 1 + step
        logits = draft.forward_tokens(tokens, positions[at], slots[at], tables_i32, seq_lens[at], bound)
        tokens, q = draft.sample(logits, requests, temps, None)
        steps.append(tokens)
        probs.append(q)
    return PendingProposal(requests, bases, verified, num_tokens, torch.stack(steps, dim=1), probs)
