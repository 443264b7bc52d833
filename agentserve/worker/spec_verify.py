"""Sampling a speculative verification step: every sampling row goes through the rejection sampler.

A step where some row verifies draft tokens scores each row's last k_i + 1 positions (the runner's
logits are laid out row after row, as spec/metadata.py describes). Rows without drafts take the same
path with k_i = 0, where the rejection sampler samples exactly as `Sampler` does, so one step never
mixes two samplers. The grammar mask is per scored position (the matcher after the drafts before it),
min_tokens bans cover the positions still under min_tokens, and a draft model's distribution q at
each draft token (`Request.spec_draft_probs`, random rows only) is what acceptance divides by.

The emitted tokens come back padded to the widest row with -1 (LaunchedStep's padded mode); the
rows are processed before the next step is scheduled, so nothing gathers from them on the device.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch

from agentserve.request import Request
from agentserve.sampling.rejection import RejectionSampler, num_banned_positions_for
from agentserve.sampling.sampler import SamplingMetadata
from agentserve.spec.metadata import SpecDecodeMetadata
from agentserve.worker.launched_step import LaunchedStep

# (sampling requests, their drafts) -> int32 bitmask [sum(k_i + 1), words] on the CPU, or None.
DraftMaskFn = Callable[[list[Request], list[list[int]]], Optional[torch.Tensor]]


def _draft_probs(requests: list[Request], drafts: list[list[int]], vocab_size: int,
                 device: torch.device) -> Optional[torch.Tensor]:
    """[T, V] q at every draft token, or None when every proposal is a point mass (n-gram lookup,
    greedy drafting): then the sampler uses the one-hot q itself, without a [T, V] tensor."""
    if all(r.spec_draft_probs is None for r, d in zip(requests, drafts) if d):
        return None
    parts = []
    for request, draft in zip(requests, drafts):
        if not draft:
            continue
        probs = request.spec_draft_probs
        if probs is not None and probs.shape[0] >= len(draft):
            parts.append(probs[:len(draft)].float())
        else:  # a point mass on each draft token
            one_hot = torch.zeros(len(draft), vocab_size, device=device)
            one_hot[torch.arange(len(draft)), torch.tensor(draft)] = 1.0
            parts.append(one_hot)
    return torch.cat(parts)


def sample_verification(sampler: RejectionSampler, logits: torch.Tensor, requests: list[Request],
                        drafts: list[list[int]], meta: SamplingMetadata,
                        mask_fn: Optional[DraftMaskFn]) -> LaunchedStep:
    """`logits` [sum(k_i + 1), V]: the target's logits at every scored position; `meta`: one row per
    request. Returns the launched step (the emitted tokens' copy to the host is queued)."""
    device = logits.device
    spec = SpecDecodeMetadata.build(drafts, device)
    num_banned = None
    if meta.banned_rows is not None:
        generated = [r.num_output_tokens + r.num_output_placeholders for r in requests]
        num_banned = num_banned_positions_for(generated, [r.sampling_params.min_tokens for r in requests], device)
    bitmask = mask_fn(requests, drafts) if mask_fn is not None else None
    if bitmask is not None and device.type == "cuda":
        bitmask = bitmask.pin_memory().to(device, non_blocking=True)
    draft_probs = _draft_probs(requests, drafts, logits.shape[-1], device)
    out = sampler(logits, spec, meta, draft_probs, num_banned_positions=num_banned, token_bitmask=bitmask)
    num_rows, width = out.output_token_ids.shape
    flat = out.output_token_ids.reshape(-1)
    counts = [width] * num_rows
    if out.logprobs is None:
        return LaunchedStep(flat, {}, counts, padded=True)
    assert out.logprob_token_ids is not None and out.sampled_ranks is not None
    ids = out.logprob_token_ids.reshape(num_rows * width, -1)
    packed = torch.cat([flat[:, None].double(), out.sampled_ranks.reshape(-1, 1).double(), ids.double(),
                        out.logprobs.reshape(num_rows * width, -1).double()], dim=1)
    return LaunchedStep(flat, {}, counts, packed, ids.shape[1], padded=True)


def padded_verification_inputs(requests: list[Request], drafts: list[list[int]], q: int, block_size: int,
                               max_model_len: int, device: torch.device
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                          torch.Tensor]:
    """A verification step laid out q tokens per row for VerifyGraphs (worker/verify_graphs.py): each
    row's last known token and drafts, then padding (token 0, slot -1, positions continuing past the
    row's, clamped to the context). Returns (ids, positions, slots, block tables, context lengths,
    flat indices of the real scored positions in spec/metadata.py's order)."""
    bs = len(requests)
    width = max(1, max(len(r.block_table) for r in requests))
    ids = np.zeros((bs, q), dtype=np.int64)
    slots = np.full((bs, q), -1, dtype=np.int64)
    tables = np.zeros((bs, width), dtype=np.int32)
    starts = np.fromiter((r.num_computed_tokens for r in requests), dtype=np.int64, count=bs)
    positions = np.minimum(starts[:, None] + np.arange(q)[None, :], max_model_len - 1)
    real: list[int] = []
    for i, (req, draft) in enumerate(zip(requests, drafts)):
        n = 1 + len(draft)
        ids[i, 0] = req.all_token_ids[req.num_computed_tokens]
        ids[i, 1:n] = draft
        table = req.block_table
        tables[i, :len(table)] = table
        pos = positions[i, :n]
        slots[i, :n] = tables[i, pos // block_size].astype(np.int64) * block_size + pos % block_size
        real.extend(range(i * q, i * q + n))
    seq_lens = (starts + q).astype(np.int32)

    def to_device(a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(a))
        return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t

    return (to_device(ids.reshape(-1)), to_device(positions.reshape(-1)), to_device(slots.reshape(-1)),
            to_device(tables), to_device(seq_lens), to_device(np.asarray(real, dtype=np.int64)))
