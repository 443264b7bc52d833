"""Per-step sampling metadata for the rows that sample this step, built from their requests."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from agentserve.sampling.bad_words import banned_next_tokens
from agentserve.request import Request
from agentserve.sampling.sampler import SamplingMetadata


def _generator_for(request: Request, device: torch.device) -> Optional[torch.Generator]:
    seed = request.sampling_params.seed
    if seed is None or request.sampling_params.greedy:
        return None
    if request.generator is None:
        # n > 1 children of a seeded request each get their own stream.
        request.generator = torch.Generator(device=device).manual_seed(seed + request.index)
    return request.generator


Column = Callable[[list, torch.dtype], torch.Tensor]


def build_sampling_metadata(requests: list[Request], vocab_size: int, device: torch.device,
                            token_bitmask: Optional[torch.Tensor] = None,
                            unseeded_generator: Optional[torch.Generator] = None) -> SamplingMetadata:
    params = [r.sampling_params for r in requests]
    temps = [p.temperature for p in params]
    all_greedy = all(t == 0.0 for t in temps)

    def col(values: list, dtype: torch.dtype) -> torch.Tensor:
        t = torch.tensor(values, dtype=dtype)
        if device.type == "cuda":
            # Pinned + non_blocking: a pageable copy would make the host wait for the running forward.
            return t.pin_memory().to(device, non_blocking=True)
        return t

    top_k = col([p.top_k for p in params], torch.int64) if any(p.top_k > 0 for p in params) else None
    top_p = col([p.top_p for p in params], torch.float32) if any(p.top_p < 1.0 for p in params) else None
    min_p = col([p.min_p for p in params], torch.float32) if any(p.min_p > 0 for p in params) else None
    generators = {}
    for row, request in enumerate(requests):
        gen = _generator_for(request, device)
        if gen is not None:
            generators[row] = gen

    meta = SamplingMetadata(temperature=col(temps, torch.float32), all_greedy=all_greedy, top_k=top_k,
                            top_p=top_p, min_p=min_p, generators=generators, token_bitmask=token_bitmask,
                            unseeded_generator=unseeded_generator)
    _add_penalties(meta, requests, vocab_size, device, col)
    _add_bans_and_biases(meta, requests, col)
    if any(p.allowed_token_ids is not None for p in params):
        allowed = torch.ones(len(requests), vocab_size, dtype=torch.bool)
        for row, p in enumerate(params):
            if p.allowed_token_ids is not None:
                allowed[row] = False
                allowed[row, torch.tensor(p.allowed_token_ids, dtype=torch.int64)] = True
        meta.allowed_mask = allowed.to(device, non_blocking=True)
    wanted = [p.logprobs for p in params if p.logprobs is not None]
    meta.max_num_logprobs = max(wanted) if wanted else None
    return meta


def _add_penalties(meta: SamplingMetadata, requests: list[Request], vocab_size: int, device: torch.device,
                   col: Column) -> None:
    params = [r.sampling_params for r in requests]
    uses_rep = any(p.repetition_penalty != 1.0 for p in params)
    uses_freq = any(p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in params)
    if not (uses_rep or uses_freq):
        return
    counts = torch.zeros(len(requests), vocab_size, dtype=torch.int32)
    prompt_mask = torch.zeros(len(requests), vocab_size, dtype=torch.bool)
    for row, request in enumerate(requests):
        if request.output_token_ids:
            out = torch.tensor(request.output_token_ids)
            counts[row].index_add_(0, out, torch.ones_like(out, dtype=torch.int32))
        prompt_mask[row, torch.tensor(request.prompt_token_ids)] = True
    meta.output_counts = counts.to(device, non_blocking=True)
    meta.prompt_mask = prompt_mask.to(device, non_blocking=True)
    if uses_rep:
        meta.repetition_penalty = col([p.repetition_penalty for p in params], torch.float32)
    if uses_freq:
        meta.presence_penalty = col([p.presence_penalty for p in params], torch.float32)
        meta.frequency_penalty = col([p.frequency_penalty for p in params], torch.float32)


def _add_bans_and_biases(meta: SamplingMetadata, requests: list[Request], col: Column) -> None:
    """min_tokens bans (EOS and stop ids while too few tokens exist) and logit_bias, as (row, token) pairs."""
    banned_rows: list[int] = []
    banned_tokens: list[int] = []
    for row, request in enumerate(requests):
        p = request.sampling_params
        # Placeholders: tokens of a step still in flight (async scheduling) count as generated.
        if request.num_output_tokens + request.num_output_placeholders < p.min_tokens:
            # As vLLM's all_stop_token_ids: the EOS ids are banned under ignore_eos too (they would not stop
            # the output, but min_tokens still keeps them out of its first tokens).
            stops = set(p.stop_token_ids) | set(request.eos_token_ids)
            for tok in stops:
                banned_rows.append(row)
                banned_tokens.append(tok)
    if banned_rows:
        meta.banned_rows = col(banned_rows, torch.int64)
        meta.banned_tokens = col(banned_tokens, torch.int64)
    biased = [(row, tok, val) for row, r in enumerate(requests)
              for tok, val in (r.sampling_params.logit_bias or {}).items()]
    # Bad words' bans as -inf biases: a request with bad words never speculates, so its row has one
    # scored position, which a bias covers in a verification step too (unlike min_tokens bans).
    biased += [(row, tok, float("-inf")) for row, r in enumerate(requests) if r.bad_words_token_ids
               for tok in banned_next_tokens(r.bad_words_token_ids, r.output_token_ids)]
    if biased:
        meta.bias_rows = col([b[0] for b in biased], torch.int64)
        meta.bias_tokens = col([b[1] for b in biased], torch.int64)
        meta.bias_values = col([float(b[2]) for b in biased], torch.float32)
