"""Greedy speculative verification in one kernel: per row, the accepted prefix of its drafts, the token
emitted after it, and the row's output in the rejection sampler's layout.

For a batch of greedy rows with no logits processors, RejectionSampler (sampling/rejection.py) reduces
to: a draft is accepted while it equals the target's argmax at its position (or, in the benchmarks'
synthetic mode, while its uniform draw is below the acceptance rate); the row emits its accepted drafts,
then the argmax at the first position not accepted. The general path spends ~20 small kernels on that
(the logits' fp32 copy, per-position metadata, padded draft and acceptance tables, a cumulative product,
gathers, a scatter): ~60 us per verification on the H200 at batch 1 (benchmarks/NOTES.md, fifteenth
session). Here one program per row reads the row's argmaxes and drafts and writes its output and count.

Used by RejectionSampler when GREEDY_VERIFY is on (the default; AGENTSERVE_GREEDY_VERIFY=0 turns it off)
and the step qualifies (every row greedy, no penalties, bans, bias, allowed-token masks,
grammar masks or logprobs). `greedy_verify_ref` is the torch reference.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from ._triton_utils import next_pow2, tl, triton, triton_enabled_for

GREEDY_VERIFY: bool = os.environ.get("AGENTSERVE_GREEDY_VERIFY", "1") == "1"
# Lanes per row: at least this many, so that drafts truncated near max_tokens (width 2..k) reuse one
# compiled variant (a compile mid-serving stalled two verifications by ~65 ms each on the H200).
MIN_BLOCK_W = 16


def set_greedy_verify(enabled: bool) -> None:
    """Whether qualifying greedy verification steps take this kernel (tests and A/B runs)."""
    global GREEDY_VERIFY
    GREEDY_VERIFY = enabled


# Not specialized on the pointers' alignment or the ints' values: the metadata's fields are views into one
# buffer at offsets that move with the batch's draft counts, and each new combination would compile.
@triton.jit(do_not_specialize=["width", "stride_out"],
            do_not_specialize_on_alignment=["greedy_ptr", "drafts_ptr", "accept_ptr", "first_ptr", "num_draft_ptr",
                                            "cu_ptr", "out_ptr", "num_acc_ptr"])
def _greedy_verify_kernel(greedy_ptr, drafts_ptr, accept_ptr, first_ptr, num_draft_ptr, cu_ptr, out_ptr, num_acc_ptr,
                          width, stride_out, HAS_ACCEPT: tl.constexpr, BLOCK_W: tl.constexpr):
    """Grid (N,). greedy [T + N] int64: the argmax of every scored position; drafts [T] int64 and
    accept [T] (int8, synthetic mode) row after row; first [N]: each row's first scored position; cu [N]
    int32: inclusive cumulative draft counts. out [N, width] int64, num_acc [N] int64."""
    row = tl.program_id(0)
    first = tl.load(first_ptr + row)
    nd = tl.load(num_draft_ptr + row)
    start = tl.load(cu_ptr + row).to(tl.int64) - nd
    j = tl.arange(0, BLOCK_W)
    in_draft = j < nd
    drafts = tl.load(drafts_ptr + start + j, mask=in_draft, other=-1)
    greedy = tl.load(greedy_ptr + first + j, mask=j <= nd, other=-1)
    if HAS_ACCEPT:
        ok = tl.load(accept_ptr + start + j, mask=in_draft, other=0) != 0
    else:
        ok = drafts == greedy
    ok = ok & in_draft
    # The accepted prefix ends at the first position that is not an accepted draft (nd when all are).
    accepted = tl.min(tl.where(ok, BLOCK_W, j), axis=0)
    emitted = tl.sum(tl.where(j == accepted, greedy, 0), axis=0)
    out = tl.where(j < accepted, drafts, -1)
    out = tl.where(j == accepted, emitted, out)
    tl.store(out_ptr + row.to(tl.int64) * stride_out + j, out, mask=j < width)
    tl.store(num_acc_ptr + row, accepted.to(tl.int64))


def block_width(width: int) -> int:
    """The kernel's lanes per row for an output `width` (max drafts + 1)."""
    return max(MIN_BLOCK_W, next_pow2(width))


def warmup_greedy_verify(device: torch.device, max_width: int) -> None:
    """Compiles the kernel's variants (real and synthetic acceptance, each lane count up to `max_width`)
    before serving, so that no verification waits on a Triton compile."""
    for width in sorted({block_width(w) for w in range(1, max_width + 1)}):
        greedy = torch.zeros(width + 1, dtype=torch.int64, device=device)
        drafts = torch.zeros(width - 1, dtype=torch.int64, device=device) if width > 1 else greedy[:0]
        count = torch.tensor([width - 1], dtype=torch.int64, device=device)
        first = torch.zeros(1, dtype=torch.int64, device=device)
        for flags in (None, torch.ones(width - 1, dtype=torch.bool, device=device)):
            greedy_verify_triton(greedy, drafts, flags, first, count, count.to(torch.int32), width)


def greedy_verify_ref(greedy_ids: torch.Tensor, draft_token_ids: torch.Tensor, accepted_flags: Optional[torch.Tensor],
                      first_logits_indices: torch.Tensor, num_draft_tokens: torch.Tensor,
                      cu_num_draft_tokens: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(output [N, width] int64: accepted drafts, the emitted token, then -1; num_accepted [N] int64)."""
    rows = first_logits_indices.shape[0]
    out = torch.full((rows, width), -1, dtype=torch.int64, device=greedy_ids.device)
    num_accepted = torch.zeros(rows, dtype=torch.int64, device=greedy_ids.device)
    starts = (cu_num_draft_tokens.to(torch.int64) - num_draft_tokens).tolist()
    for i, (first, nd, start) in enumerate(zip(first_logits_indices.tolist(), num_draft_tokens.tolist(), starts)):
        a = 0
        while a < nd:
            draft = int(draft_token_ids[start + a])
            ok = bool(accepted_flags[start + a]) if accepted_flags is not None else draft == int(greedy_ids[first + a])
            if not ok:
                break
            out[i, a] = draft
            a += 1
        out[i, a] = greedy_ids[first + a]
        num_accepted[i] = a
    return out, num_accepted


def greedy_verify_triton(greedy_ids: torch.Tensor, draft_token_ids: torch.Tensor,
                         accepted_flags: Optional[torch.Tensor], first_logits_indices: torch.Tensor,
                         num_draft_tokens: torch.Tensor, cu_num_draft_tokens: torch.Tensor,
                         width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """greedy_verify_ref's contract through the kernel (CUDA, or Triton's interpreter on the CPU)."""
    rows = first_logits_indices.shape[0]
    out = torch.empty((rows, width), dtype=torch.int64, device=greedy_ids.device)
    num_accepted = torch.empty(rows, dtype=torch.int64, device=greedy_ids.device)
    if rows == 0:
        return out, num_accepted
    # An empty draft list still needs a valid pointer (nothing is read through it: every mask is off).
    drafts = draft_token_ids if draft_token_ids.numel() else greedy_ids
    flags = accepted_flags.to(torch.int8) if accepted_flags is not None else drafts
    _greedy_verify_kernel[(rows,)](greedy_ids, drafts, flags, first_logits_indices, num_draft_tokens,
                                   cu_num_draft_tokens, out, num_accepted, width, out.stride(0),
                                   HAS_ACCEPT=accepted_flags is not None, BLOCK_W=block_width(width),
                                   num_warps=1)
    return out, num_accepted


def greedy_verify(greedy_ids: torch.Tensor, draft_token_ids: torch.Tensor, accepted_flags: Optional[torch.Tensor],
                  first_logits_indices: torch.Tensor, num_draft_tokens: torch.Tensor,
                  cu_num_draft_tokens: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel on CUDA, the reference elsewhere."""
    run = greedy_verify_triton if triton_enabled_for(greedy_ids) else greedy_verify_ref
    return run(greedy_ids, draft_token_ids, accepted_flags, first_logits_indices, num_draft_tokens,
               cu_num_draft_tokens, width)
