"""Sampling on the device: penalties, grammar masks, greedy, temperature, top-k, top-p, min-p,
per-request seeds, and top-n logprobs of the model's raw distribution.

Sampling draws `argmax(probs / q)` with q ~ Exp(1) (the exponential race, equivalent to drawing from
`probs`). Seeded rows take their noise from their own generator, so a seeded request gets the same
tokens whatever else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from agentserve.kernels.argmax import argmax_rows
from agentserve.kernels.token_bitmask import apply_token_bitmask

_NEG_INF = float("-inf")


@dataclass
class SamplingMetadata:
    temperature: torch.Tensor          # [N] fp32; 0 = greedy
    all_greedy: bool
    top_k: Optional[torch.Tensor]      # [N] int64, 0 = off; None when no row uses it
    top_p: Optional[torch.Tensor]      # [N] fp32; None when no row uses it
    min_p: Optional[torch.Tensor]      # [N] fp32
    generators: dict[int, torch.Generator]  # row -> generator for seeded rows
    # The other rows' generator: the engine's, seeded by --seed (vLLM's), so that unseeded requests are
    # reproducible across restarts. None: torch's default generator.
    unseeded_generator: Optional[torch.Generator] = None
    # Penalties (None when no row uses them).
    repetition_penalty: Optional[torch.Tensor] = None  # [N]
    presence_penalty: Optional[torch.Tensor] = None    # [N]
    frequency_penalty: Optional[torch.Tensor] = None   # [N]
    prompt_mask: Optional[torch.Tensor] = None         # [N, V] bool: token occurs in the prompt
    output_counts: Optional[torch.Tensor] = None       # [N, V] counts in the output so far
    # Tokens that may not be sampled yet (min_tokens: EOS and stop ids), as (row, token) pairs.
    banned_rows: Optional[torch.Tensor] = None
    banned_tokens: Optional[torch.Tensor] = None
    # logit_bias as (row, token, value) triples added to the logits first (None when no row has one).
    bias_rows: Optional[torch.Tensor] = None
    bias_tokens: Optional[torch.Tensor] = None
    bias_values: Optional[torch.Tensor] = None
    # allowed_token_ids: [N, V] bool, False where a row may not sample (None when no row restricts).
    allowed_mask: Optional[torch.Tensor] = None
    max_num_logprobs: Optional[int] = None  # None: no row wants logprobs
    # Grammar: int32 bitmask [N, ceil(V / 32)] for constrained rows (others all ones).
    token_bitmask: Optional[torch.Tensor] = None


@dataclass
class SamplerOutput:
    sampled_token_ids: torch.Tensor            # [N] int64
    logprob_token_ids: Optional[torch.Tensor]  # [N, 1 + n]: sampled token then the top n
    logprobs: Optional[torch.Tensor]           # [N, 1 + n]
    sampled_ranks: Optional[torch.Tensor]      # [N]


def apply_penalties(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    if meta.repetition_penalty is not None:
        assert meta.prompt_mask is not None and meta.output_counts is not None
        seen = meta.prompt_mask | (meta.output_counts > 0)
        penalty = meta.repetition_penalty[:, None].expand_as(logits)
        # HF / vLLM semantics: divide positive logits, multiply negative ones.
        scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen, scaled, logits)
    if meta.frequency_penalty is not None:
        assert meta.output_counts is not None and meta.presence_penalty is not None
        counts = meta.output_counts.to(logits.dtype)
        logits = logits - meta.frequency_penalty[:, None] * counts
        logits = logits - meta.presence_penalty[:, None] * (counts > 0).to(logits.dtype)
    return logits


def top_k_top_p_min_p(logits: torch.Tensor, top_k: Optional[torch.Tensor], top_p: Optional[torch.Tensor],
                      min_p: Optional[torch.Tensor]) -> torch.Tensor:
    """Masks logits outside the min-p / top-k / nucleus sets with -inf (after temperature), in vLLM V1's order:
    min_p first (an argmax-invariant logits processor there), then top-k and top-p over what it kept, so a
    nucleus is taken over the min-p-filtered distribution (transformers and SGLang apply min_p last)."""
    if min_p is not None:
        probs = logits.softmax(dim=-1)
        threshold = probs.max(dim=-1, keepdim=True).values * min_p[:, None]
        logits = logits.masked_fill(probs < threshold, _NEG_INF)
    if top_k is not None:
        vocab = logits.shape[-1]
        k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab)
        sorted_desc = logits.sort(dim=-1, descending=True).values
        kth = sorted_desc.gather(-1, (k - 1)[:, None])
        logits = logits.masked_fill(logits < kth, _NEG_INF)
    if top_p is not None:
        sorted_logits, idx = logits.sort(dim=-1, descending=False)
        probs = sorted_logits.softmax(dim=-1)
        cum = probs.cumsum(dim=-1)
        # Drop the low tail whose mass stays within 1 - top_p; the top token always survives.
        drop = cum <= (1 - top_p)[:, None]
        drop[:, -1] = False
        logits = logits.scatter(-1, idx, sorted_logits.masked_fill(drop, _NEG_INF))
    return logits


def draw_noise(num_rows: int, vocab_size: int, generators: dict[int, torch.Generator],
               device: torch.device, unseeded: Optional[torch.Generator] = None) -> torch.Tensor:
    """The exponential race's noise q [num_rows, vocab_size] fp32: `unseeded` (the engine's
    generator) for the batch, each seeded row's own generator over its row (one kernel per seeded
    row). Needs nothing from the logits, so a step can draw it early (model_runner.launch does,
    before grammar masks)."""
    q = torch.empty(num_rows, vocab_size, dtype=torch.float32, device=device)
    if len(generators) < num_rows:
        q.exponential_(generator=unseeded)
    for row, gen in generators.items():
        q[row].exponential_(generator=gen)
    return q


def random_sample(probs: torch.Tensor, generators: dict[int, torch.Generator],
                  noise: Optional[torch.Tensor] = None, unseeded: Optional[torch.Generator] = None) -> torch.Tensor:
    """argmax(probs / q); `noise`: q drawn earlier by draw_noise (the same draws: each generator is
    used once per step, whenever that happens)."""
    if noise is None:
        noise = draw_noise(probs.shape[0], probs.shape[1], generators, probs.device, unseeded)
    return argmax_rows(probs.div(noise))


def process_logits(logits: torch.Tensor, meta: SamplingMetadata) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One sampling row's processing, shared by the sampler and speculative verification so that every
    scored position sees the same distribution. Returns (masked, probs): `masked` has penalties,
    min_tokens bans and the grammar mask applied (greedy takes its argmax); `probs` adds temperature
    and top-k / top-p / min-p (None when every row is greedy). Greedy rows' `probs` are unused.
    logit_bias comes first (OpenAI: added to the model's logits before sampling)."""
    if meta.bias_rows is not None and meta.bias_tokens is not None and meta.bias_values is not None:
        logits = logits.index_put((meta.bias_rows, meta.bias_tokens), meta.bias_values, accumulate=True)
    logits = apply_penalties(logits, meta)
    if meta.allowed_mask is not None:
        logits = logits.masked_fill(~meta.allowed_mask, _NEG_INF)
    if meta.banned_rows is not None and meta.banned_tokens is not None:
        # new_full fills on the device; torch.tensor(..., device=) would be a blocking copy.
        logits = logits.index_put((meta.banned_rows, meta.banned_tokens), logits.new_full((), _NEG_INF))
    if meta.token_bitmask is not None:
        logits = apply_token_bitmask(logits.contiguous(), meta.token_bitmask)  # in place: -inf where disallowed
    if meta.all_greedy:
        return logits, None
    temp = meta.temperature
    scaled = logits / torch.where(temp > 0, temp, 1.0)[:, None]
    scaled = top_k_top_p_min_p(scaled, meta.top_k, meta.top_p, meta.min_p)
    return logits, scaled.softmax(dim=-1)


def token_logprobs(raw_logprobs: torch.Tensor, token_ids: torch.Tensor,
                   num_logprobs: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids [M, 1 + n], logprobs [M, 1 + n], ranks [M]) of `token_ids` [M] and the top n under the raw
    distribution `raw_logprobs` [M, V]."""
    sampled_lp = raw_logprobs.gather(-1, token_ids[:, None])
    ranks = (raw_logprobs > sampled_lp).sum(dim=-1) + 1
    if num_logprobs > 0:
        top_lp, top_ids = raw_logprobs.topk(num_logprobs, dim=-1)
        return torch.cat([token_ids[:, None], top_ids], dim=-1), torch.cat([sampled_lp, top_lp], dim=-1), ranks
    return token_ids[:, None], sampled_lp, ranks


class Sampler:
    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata,
                 noise: Optional[torch.Tensor] = None) -> SamplerOutput:
        """`noise`: the random rows' q from draw_noise, when the caller drew it ahead."""
        logits = logits.float()
        raw_logprobs = logits.log_softmax(dim=-1) if meta.max_num_logprobs is not None else None
        masked, probs = process_logits(logits, meta)
        greedy = argmax_rows(masked)
        if probs is None:
            sampled = greedy
        else:
            sampled = random_sample(probs, meta.generators, noise, meta.unseeded_generator)
            sampled = torch.where(meta.temperature > 0, sampled, greedy)
        if raw_logprobs is None:
            return SamplerOutput(sampled, None, None, None)
        ids, lps, ranks = token_logprobs(raw_logprobs, sampled, meta.max_num_logprobs or 0)
        return SamplerOutput(sampled, ids, lps, ranks)
