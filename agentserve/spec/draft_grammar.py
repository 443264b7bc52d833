"""The draft model's side of output constraints: it proposes under a copy of each request's matcher
(spec/draft.py), masking each draft step and advancing the copy over what it samples; the request's
own matcher is not touched.

A matcher can fail (a backend reaching one of its limits raises on a fill or a token). Without
speculation that fails its request alone where its sequence gets there (engine/constraints.py,
engine/output.py); a proposal must not change that: a failing copy ends that row's drafts before the
step that failed, and never fails the batch's proposal.
"""

from __future__ import annotations

from typing import Optional

import torch

from agentserve.grammar.interface import allocate_token_bitmask
from agentserve.grammar.state import GrammarState
from agentserve.request import Request


def grammar_copies(requests: list[Request]) -> tuple[list[Optional[GrammarState]], set[int]]:
    """The draft's copy of each request's matcher (None: unconstrained), and the rows whose copy failed
    (they propose nothing: accept_on_host)."""
    copies: list[Optional[GrammarState]] = []
    failed: set[int] = set()
    for i, request in enumerate(requests):
        try:
            copies.append(request.grammar.copy() if request.grammar is not None else None)
        except Exception:  # noqa: BLE001 - that request's matcher (a backend limit): not the batch's
            copies.append(None)
            failed.add(i)
    return copies, failed


def fill_masks(grammars: list[Optional[GrammarState]], vocab_size: int) -> tuple[Optional[torch.Tensor], list[int]]:
    """The rows' grammar masks (None when no row is constrained), and the rows whose matcher failed to
    fill one: a backend limit fails that request alone (where its own sequence reaches it), never the
    batch; their rows are left unmasked and what they sample is dropped (accept_on_host)."""
    constrained = [(row, g) for row, g in enumerate(grammars) if g is not None]
    if not constrained:
        return None, []
    bitmask = allocate_token_bitmask(len(grammars), vocab_size)
    unfillable = []
    for row, grammar in constrained:
        try:
            grammar.fill(bitmask, row)
        except Exception:  # noqa: BLE001 - that request's matcher: see above
            bitmask[row].fill_(-1)
            unfillable.append(row)
    return bitmask, unfillable


def accept_on_host(active: list[int], host: list[int], drafts: list[list[int]],
                    grammars: list[Optional[GrammarState]], num_tokens: list[int], failed: set[int]) -> list[int]:
    """Appends each row's token (through its matcher copy); returns the rows that go on. A row in
    `failed` (its copy could not give this position's mask) or whose copy fails on the token stops
    there, without the drafts whose verification would need the failing step: the verification fills
    the mask after its last draft, and the request must meet its matcher's failure only where its
    sequence really goes (as without speculation), never because of a draft the target rejects."""
    still: list[int] = []
    for row, i in enumerate(active):
        if i in failed:
            if drafts[i]:
                drafts[i].pop()  # the failing mask is the one after this draft
            continue
        drafts[i].append(host[row])
        grammar = grammars[i]
        try:
            ended = grammar is not None and (not grammar.accept_token(host[row]) or grammar.is_terminated())
        except Exception:  # noqa: BLE001 - that request's matcher (a backend limit): not the batch's
            drafts[i].pop()
            continue
        if ended and grammar is not None and grammar.rejected:
            drafts[i].pop()  # cannot happen under the mask; never propose an invalid token
        elif len(drafts[i]) < num_tokens[i] and not ended:
            still.append(i)
    return still
