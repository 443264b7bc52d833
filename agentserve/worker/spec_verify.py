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

import torch

from agentserve.request import Request
from agentserve.sampling.rejection import RejectionSampler, num_banned_positions_for
from agentserve.sampling.sampler import SamplingMetadata
from agentserve.spec.device_drafts import device_rows, scatter_device_drafts, scatter_indexes
from agentserve.spec.draft_inputs import (DraftRun, PaddedInputs, padded_from_device, padded_host_parts,
                                          to_device_packed)
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
    on_device = device_rows(requests, drafts)
    parts = []
    for request, draft, values in zip(requests, drafts, on_device):
        if not draft:
            continue
        probs = request.spec_draft_probs
        if probs is not None and probs.shape[0] >= len(draft):
            parts.append(probs[:len(draft)].float())
        else:  # a point mass on each draft token
            one_hot = torch.zeros(len(draft), vocab_size, device=device)
            tokens = values if values is not None else torch.tensor(draft, device=device)
            one_hot[torch.arange(len(draft), device=device), tokens] = 1.0
            parts.append(one_hot)
    return torch.cat(parts)


def sample_verification(sampler: RejectionSampler, logits: torch.Tensor, requests: list[Request],
                        drafts: list[list[int]], meta: SamplingMetadata, mask_fn: Optional[DraftMaskFn],
                        spec: Optional[SpecDecodeMetadata] = None) -> LaunchedStep:
    """`logits` [sum(k_i + 1), V]: the target's logits at every scored position; `meta`: one row per
    request; `spec`: the drafts' metadata when already on the device (else built here). Returns the
    launched step (the emitted tokens' copy to the host is queued)."""
    device = logits.device
    if spec is None:
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
        step = LaunchedStep(flat, {}, counts, padded=True)
    else:
        assert out.logprob_token_ids is not None and out.sampled_ranks is not None
        ids = out.logprob_token_ids.reshape(num_rows * width, -1)
        packed = torch.cat([flat[:, None].double(), out.sampled_ranks.reshape(-1, 1).double(), ids.double(),
                            out.logprobs.reshape(num_rows * width, -1).double()], dim=1)
        step = LaunchedStep(flat, {}, counts, packed, ids.shape[1], padded=True)
    step.verified = (out.output_token_ids, out.num_accepted)
    return step



def padded_verification_inputs(requests: list[Request], drafts: list[list[int]], q: int, block_size: int,
                               max_model_len: int, device: torch.device) -> tuple[PaddedInputs, SpecDecodeMetadata]:
    """A verification step laid out q tokens per row for VerifyGraphs (worker/verify_graphs.py): each
    row's last known token and its drafts, then padding; `real_index` lists the scored positions in
    spec/metadata.py's order. The drafts' SpecDecodeMetadata travels in the same host-to-device copy
    (the device idles while the host prepares a verification step: one copy fewer on that path)."""
    runs = [DraftRun([r.all_token_ids[r.num_computed_tokens], *d], r.num_computed_tokens, r.block_table)
            for r, d in zip(requests, drafts)]
    padded = padded_host_parts(runs, q, block_size, max_model_len)
    spec, num_draft = SpecDecodeMetadata.host_parts(drafts)
    # Drafts still on the device (spec/device_drafts.py) are placeholders in both host builds: their
    # positions travel in the same copy and the values are put in place on the device after it.
    on_device = device_rows(requests, drafts)
    indexes = list(scatter_indexes(drafts, on_device, q)) if any(t is not None for t in on_device) else []
    d = to_device_packed(padded + spec + indexes, device)
    inputs = padded_from_device(d[:len(padded)], padded[3].shape)
    metadata = SpecDecodeMetadata.from_device(d[len(padded):len(padded) + len(spec)], num_draft)
    if indexes:
        scatter_device_drafts(on_device, inputs.input_ids, d[-2], metadata.draft_token_ids, d[-1])
    return inputs, metadata
