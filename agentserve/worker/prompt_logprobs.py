"""Prompt logprobs (vLLM's `prompt_logprobs`; OpenAI completions' `echo` with `logprobs`): the raw
log-probability of each prompt token given the tokens before it, with its rank and the top n
alternatives, as the prefill chunks compute them.

A chunk computing positions [s, s + t) of a prompt of P tokens scores prompt tokens s + 1 .. up to P - 1
from its logits at positions s .. (position p's logits predict token p + 1; the last prompt position's
predict the first output token, which the sampler handles). The request's `num_prompt_logprobs_planned`
cursor makes a recompute after preemption score nothing twice, and the prefix cache is not consulted
for positions not scored yet (kv_cache_manager.get_computed_blocks): cached pages carry no logits.

The scores stay on the device until the step's result is read, like the sampled ids: one host copy,
queued behind the step, read when the step is processed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from agentserve.request import Request
from agentserve.sampling.sampler import token_logprobs
from agentserve.worker.launched_step import copy_to_host
from agentserve.worker.step_inputs import ScheduledChunk

# Rows scored at once: a slice's logits are rows x vocabulary floats twice (the logits and their
# log-softmax), ~1 GiB at 128k vocabulary; an 8k-token prefill chunk is scored in 8 slices.
ROWS_PER_SLICE = 1024


@dataclass
class PromptLogprobRows:
    """One step's positions that score prompt tokens, grouped by request in step order."""
    requests: list[Request]
    first_token: list[int]  # per request: the prompt index of the first token its rows score
    counts: list[int]       # per request: how many consecutive prompt tokens its rows score
    flat_indices: list[int]  # the step's flat positions (their logits), all requests' in order
    target_ids: list[int]   # the prompt token each position scores
    num_top: int            # the widest top-n any of the requests asks for


def plan_prompt_logprob_rows(chunks: list[ScheduledChunk]) -> Optional[PromptLogprobRows]:
    """The rows of a step (before its launch: num_computed_tokens is each chunk's start) that score
    prompt tokens; advances each request's cursor past them. None when no row scores any."""
    plan: Optional[PromptLogprobRows] = None
    offset = 0
    for chunk in chunks:
        req = chunk.request
        if req.prompt_logprobs is not None:
            start = req.num_computed_tokens
            lo = max(start, req.num_prompt_logprobs_planned - 1)
            hi = min(start + chunk.num_tokens, req.num_prompt_tokens - 1)
            if hi > lo:
                if plan is None:
                    plan = PromptLogprobRows([], [], [], [], [], 0)
                plan.requests.append(req)
                plan.first_token.append(lo + 1)
                plan.counts.append(hi - lo)
                plan.flat_indices.extend(range(offset + lo - start, offset + hi - start))
                plan.target_ids.extend(req.prompt_token_ids[lo + 1:hi + 1])
                plan.num_top = max(plan.num_top, req.sampling_params.prompt_logprobs or 0)
                req.num_prompt_logprobs_planned = hi + 1
        offset += chunk.num_tokens
    return plan


def score_prompt_rows(logits_of: Callable[[int, int], torch.Tensor], plan: PromptLogprobRows,
                      device: torch.device) -> torch.Tensor:
    """[rows, 2 + 2n] float64 on the device: the target's logprob, its rank (1 = the argmax), the top
    n ids, the top n logprobs. `logits_of(lo, hi)` gives the logits of the plan's rows lo .. hi - 1."""
    targets = torch.tensor(plan.target_ids, dtype=torch.int64, device=device)
    parts = []
    for lo in range(0, len(plan.flat_indices), ROWS_PER_SLICE):
        hi = min(lo + ROWS_PER_SLICE, len(plan.flat_indices))
        raw = logits_of(lo, hi).float().log_softmax(dim=-1)
        ids, lps, ranks = token_logprobs(raw, targets[lo:hi], plan.num_top)
        parts.append(torch.cat([lps[:, :1].double(), ranks[:, None].double(), ids[:, 1:].double(),
                                lps[:, 1:].double()], dim=1))
    return torch.cat(parts)


class PromptScores:
    """A launched step's prompt scores on their way to the host (pinned copy, event), then read once."""

    def __init__(self, plan: PromptLogprobRows, scores: torch.Tensor) -> None:
        self.plan = plan
        self._host, self._event = copy_to_host(scores)

    def rows(self) -> list[list[float]]:
        if self._event is not None:
            self._event.synchronize()
        return self._host.tolist()
