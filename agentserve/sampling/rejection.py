"""Speculative verification: rejection sampling of draft tokens against the target's k+1 positions.

Row i proposed drafts x_0..x_{k-1}; the target scored positions 0..k (see spec/metadata.py). Each
position's distribution p_j is the target's *processed* distribution, made by the same
`process_logits` as a normal decode step, with the drafts before j counted as generated for the
penalties (and for min_tokens).

- Greedy rows (temperature 0): x_j is accepted while it equals argmax p_j; the first mismatch emits
  argmax p_j (the recovered token); when all k are accepted, argmax p_k is the bonus token. The output
  is exactly the target's greedy chain.
- Random rows: x_j is accepted with probability min(1, p_j(x_j) / q_j(x_j)), q being the draft's
  distribution (a one-hot on the proposal when `draft_probs` is None, as for n-gram lookup, so the
  acceptance is p_j(x_j)). The first rejection emits a draw from norm(max(p_j - q_j, 0)); when all
  are accepted the bonus is drawn from p_k. The emitted tokens are distributed exactly as the target's.

Randomness per row: k uniforms (acceptance) then one vector of V Exp(1) noises, used by the exponential
race `argmax(dist / noise)` for the one token that is not an accepted draft (recovered or bonus: each
row emits exactly one of them, so one noise vector serves both without correlating anything). Seeded
rows draw these from their own generator in that order, so a seeded request's tokens depend only on its
own seed, drafts and logits, never on the rest of the batch; a row with no drafts consumes its generator
exactly as `Sampler` does and samples the same token.

Everything stays on the device; nothing here waits for the host. Logprobs are the target's raw
distribution (as `Sampler` reports them), at each emitted position.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch

from agentserve.kernels import greedy_verify as greedy_verify_kernel
from agentserve.kernels.argmax import argmax_rows
from agentserve.sampling.sampler import SamplingMetadata, draw_noise, process_logits, token_logprobs
from agentserve.spec.metadata import SpecDecodeMetadata

_NEG_INF = float("-inf")


@dataclass
class RejectionSamplerOutput:
    # Per row: accepted drafts, then the recovered or bonus token, then -1 padding (vLLM's layout).
    output_token_ids: torch.Tensor             # [N, max_spec_len + 1] int64
    num_accepted: torch.Tensor                 # [N] int64: accepted drafts (the row emits num_accepted + 1)
    logprob_token_ids: Optional[torch.Tensor]  # [N, max_spec_len + 1, 1 + n]: emitted token then the top n
    logprobs: Optional[torch.Tensor]           # [N, max_spec_len + 1, 1 + n] (-inf at padding)
    sampled_ranks: Optional[torch.Tensor]      # [N, max_spec_len + 1] (0 at padding)


def _counts_with_drafts(output_counts: torch.Tensor, spec: SpecDecodeMetadata) -> torch.Tensor:
    """[T + N, V]: each logits row's output counts, the drafts before its position included."""
    counts = output_counts.index_select(0, spec.logits_row_ids)
    if spec.total_num_draft_tokens == 0:
        return counts
    # Draft j of a row counts from that row's position j + 1 on: add a 1 at logits row s + j + 1, then
    # a running sum over the flat rows. A row's position 0 never receives one, so subtracting the
    # running sum at s (everything from earlier rows) leaves each row its own prefix counts.
    added = torch.zeros_like(counts)
    added.index_put_((spec.target_logits_indices + 1, spec.draft_token_ids),
                     torch.ones_like(spec.draft_token_ids, dtype=counts.dtype), accumulate=True)
    running = added.cumsum(dim=0, dtype=counts.dtype)
    return counts + running - running.index_select(0, spec.first_logits_indices.index_select(0, spec.logits_row_ids))


def _positions_of(rows: torch.Tensor, spec: SpecDecodeMetadata) -> tuple[torch.Tensor, torch.Tensor]:
    """For per-request entries on `rows`: (logits rows [E, max_spec_len + 1], in-row mask [E, width]).
    Every entry covers max_spec_len + 1 positions so the shapes stay static (no boolean selection, so
    no host sync); positions past its row's last repeat the last and are False in the mask."""
    pos = torch.arange(spec.max_spec_len + 1, device=rows.device)
    num_positions = spec.num_draft_tokens_tensor.index_select(0, rows) + 1
    logit_rows = spec.first_logits_indices.index_select(0, rows)[:, None] + torch.minimum(
        pos[None, :], (num_positions - 1)[:, None])
    return logit_rows, pos[None, :] < num_positions[:, None]


def _expand_bans(meta: SamplingMetadata, spec: SpecDecodeMetadata,
                 num_banned_positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits rows, tokens, additive values) for min_tokens bans: a ban of row r covers its first
    `num_banned_positions[r]` positions. Pairs past that (or past the row) add 0 instead of -inf."""
    assert meta.banned_rows is not None and meta.banned_tokens is not None
    rows = meta.banned_rows
    logit_rows, in_row = _positions_of(rows, spec)
    pos = torch.arange(logit_rows.shape[1], device=rows.device)
    covered = in_row & (pos[None, :] < num_banned_positions.index_select(0, rows)[:, None])
    values = torch.zeros(covered.shape, device=rows.device).masked_fill(covered, _NEG_INF)
    tokens = meta.banned_tokens[:, None].expand_as(logit_rows)
    return logit_rows.reshape(-1), tokens.reshape(-1), values.reshape(-1)


def _expand_bias(meta: SamplingMetadata, spec: SpecDecodeMetadata
                 ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """logit_bias (row, token, value) triples -> one per scored position of each row (value 0 at the
    padding positions _positions_of adds)."""
    if meta.bias_rows is None or meta.bias_tokens is None or meta.bias_values is None:
        return None, None, None
    logit_rows, in_row = _positions_of(meta.bias_rows, spec)
    values = torch.where(in_row, meta.bias_values[:, None], 0.0)
    tokens = meta.bias_tokens[:, None].expand_as(logit_rows)
    return logit_rows.reshape(-1), tokens.reshape(-1), values.reshape(-1)


def expand_sampling_metadata(meta: SamplingMetadata, spec: SpecDecodeMetadata,
                             num_banned_positions: Optional[torch.Tensor] = None,
                             token_bitmask: Optional[torch.Tensor] = None) -> SamplingMetadata:
    """Per-request metadata [N] -> per scored position [T + N], for `process_logits`.

    `num_banned_positions[r]` (int64 [N]): how many of row r's leading positions the min_tokens bans in
    `meta` still cover (min_tokens minus tokens generated so far); required when `meta` has bans.
    `token_bitmask` ([T + N, words]): the grammar mask at each position (each position has its own
    matcher state), replacing `meta.token_bitmask`. The expanded metadata has no bans (the
    `RejectionSampler` applies them per position, see `_expand_bans`) and no generators (they belong
    to request rows).
    """
    if meta.token_bitmask is not None and token_bitmask is None:
        raise ValueError("a grammar-constrained speculative step needs a bitmask per scored position "
                         "(token_bitmask [num_logits, words]); the per-request one covers position 0 only")
    if meta.banned_rows is not None and num_banned_positions is None:
        raise ValueError("min_tokens bans under speculation need num_banned_positions per row")
    rows = spec.logits_row_ids
    bias_rows, bias_tokens, bias_values = _expand_bias(meta, spec)

    def per_position(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if t is None else t.index_select(0, rows)

    return replace(
        meta, temperature=meta.temperature.index_select(0, rows), top_k=per_position(meta.top_k),
        top_p=per_position(meta.top_p), min_p=per_position(meta.min_p), generators={},
        repetition_penalty=per_position(meta.repetition_penalty),
        presence_penalty=per_position(meta.presence_penalty),
        frequency_penalty=per_position(meta.frequency_penalty), prompt_mask=per_position(meta.prompt_mask),
        allowed_mask=per_position(meta.allowed_mask),
        output_counts=None if meta.output_counts is None else _counts_with_drafts(meta.output_counts, spec),
        banned_rows=None, banned_tokens=None, token_bitmask=token_bitmask, bias_rows=bias_rows,
        bias_tokens=bias_tokens, bias_values=bias_values)


def _draw_noise(spec: SpecDecodeMetadata, vocab_size: int, meta: SamplingMetadata, device: torch.device,
                with_noise: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(uniforms [T], exponential noise [N, V], or None without `with_noise`). Unseeded rows share one
    draw per tensor (from meta.unseeded_generator); each seeded row then redraws its own slice from its
    generator. That per-row loop
    is unavoidable: a torch.Generator drives one tensor op at a time. It runs over seeded rows only and
    issues two small device ops per row, never a per-token Python loop. Synthetic acceptance with
    every row greedy needs the uniforms alone (no token is drawn): a [N, V] draw fewer per step."""
    num_rows, generators, unseeded = spec.num_rows, meta.generators, meta.unseeded_generator
    uniforms = torch.empty(spec.total_num_draft_tokens, device=device)
    if len(generators) < num_rows:
        uniforms.uniform_(generator=unseeded)
    if generators:
        starts = [0]
        for k in spec.num_draft_tokens:
            starts.append(starts[-1] + k)
        for row, gen in generators.items():
            k = spec.num_draft_tokens[row]
            if k:  # a zero-length draw would still advance some generators' offsets
                uniforms[starts[row]:starts[row] + k].uniform_(generator=gen)
    # After every uniform, as each generator (and the device's) then draws its noise: the same
    # sequence per generator as drawing a row's uniforms and noise together.
    noise = draw_noise(num_rows, vocab_size, generators, device, unseeded) if with_noise else None
    return uniforms, noise


class RejectionSampler:
    def __init__(self, synthetic_acceptance: Optional[float] = None) -> None:
        """`synthetic_acceptance` (benchmarks only, `--spec-synthetic-acceptance`): accept each draft
        token with this probability whatever its value, and emit the target's own sample where the row
        stops. On random weights real acceptance is meaningless; this measures the system's cost at a
        chosen acceptance rate. The output is not the target's distribution."""
        if synthetic_acceptance is not None and not 0.0 <= synthetic_acceptance <= 1.0:
            raise ValueError(f"spec_synthetic_acceptance must be in [0, 1], got {synthetic_acceptance}")
        self.synthetic_acceptance = synthetic_acceptance

    def __call__(self, target_logits: torch.Tensor, spec: SpecDecodeMetadata, meta: SamplingMetadata,
                 draft_probs: Optional[torch.Tensor] = None, *,
                 num_banned_positions: Optional[torch.Tensor] = None,
                 token_bitmask: Optional[torch.Tensor] = None) -> RejectionSamplerOutput:
        """`target_logits` [T + N, V]: the target's logits at every scored position (spec's layout).
        `meta`: the usual per-request metadata [N] (generators keyed by request row). `draft_probs`
        [T, V]: the draft's distribution at each draft token, None for a one-hot proposal (n-gram).
        See `expand_sampling_metadata` for the two keyword arguments. As with `Sampler`, fp32 logits
        may be masked in place by the grammar (saves a [T + N, V] copy)."""
        num_rows, width = spec.num_rows, spec.max_spec_len + 1
        device = target_logits.device
        if greedy_verify_kernel.GREEDY_VERIFY and _plain_greedy(meta, token_bitmask):
            return self._greedy_verify(target_logits, spec, meta, width)
        logits = target_logits.float()
        raw_logprobs = logits.log_softmax(dim=-1) if meta.max_num_logprobs is not None else None
        position_meta = expand_sampling_metadata(meta, spec, num_banned_positions, token_bitmask)
        if meta.banned_rows is not None:
            assert num_banned_positions is not None
            ban_rows, ban_tokens, ban_values = _expand_bans(meta, spec, num_banned_positions)
            logits = logits.index_put((ban_rows, ban_tokens), ban_values, accumulate=True)
        masked, probs = process_logits(logits, position_meta)
        greedy_ids = argmax_rows(masked)  # [T + N]

        drafts = spec.draft_token_ids
        draft_rows = spec.draft_row_ids
        accepted = drafts == greedy_ids.index_select(0, spec.target_logits_indices)
        synthetic = self.synthetic_acceptance is not None
        if probs is not None or synthetic:
            uniforms, noise = _draw_noise(spec, logits.shape[-1], meta, device, with_noise=probs is not None)
        if self.synthetic_acceptance is not None:
            accepted = uniforms < self.synthetic_acceptance
        elif probs is not None:
            target_p = probs[spec.target_logits_indices, drafts]
            if draft_probs is None:
                draft_q = torch.ones_like(target_p)
            else:
                draft_q = draft_probs[torch.arange(drafts.shape[0], device=device), drafts].float()
            # u < p / q, written without the division; a token the target cannot emit (p = 0) is never
            # accepted, even at u = 0.
            random_accepted = (draft_q > 0) & (uniforms * draft_q < target_p)
            accepted = torch.where(meta.temperature.index_select(0, draft_rows) > 0, random_accepted, accepted)

        # Accepted count = length of the all-accepted prefix of each row.
        draft_positions = spec.draft_positions
        padded_drafts = torch.full((num_rows, width), -1, dtype=torch.int64, device=device)
        padded_drafts[draft_rows, draft_positions] = drafts
        padded_accepted = torch.zeros((num_rows, width), dtype=torch.int64, device=device)
        padded_accepted[draft_rows, draft_positions] = accepted.to(torch.int64)
        num_accepted = padded_accepted.cumprod(dim=1).sum(dim=1)

        # The one non-draft token of each row, scored at position num_accepted.
        emit_rows = spec.first_logits_indices + num_accepted
        emitted = greedy_ids.index_select(0, emit_rows)
        if probs is not None:
            assert noise is not None
            if synthetic:
                sampled = probs.index_select(0, emit_rows).div(noise).argmax(dim=-1)
            else:
                sampled = self._recover(probs, emit_rows, num_accepted, spec, draft_probs, noise)
            emitted = torch.where(meta.temperature > 0, sampled, emitted)

        positions = torch.arange(width, device=device)[None, :]
        output = torch.where(positions < num_accepted[:, None], padded_drafts, -1)
        output.scatter_(1, num_accepted[:, None], emitted[:, None])
        if raw_logprobs is None:
            return RejectionSamplerOutput(output, num_accepted, None, None, None)
        return self._logprobs(raw_logprobs, output, num_accepted, spec, meta.max_num_logprobs or 0)

    def _greedy_verify(self, target_logits: torch.Tensor, spec: SpecDecodeMetadata, meta: SamplingMetadata,
                       width: int) -> RejectionSamplerOutput:
        """Every row greedy, nothing processing the logits: the argmaxes, then one kernel for the accepted
        prefixes and the emitted tokens (kernels/greedy_verify.py). The same output, and the same random
        draws in synthetic mode, as the general path below."""
        greedy_ids = argmax_rows(target_logits)  # the argmax of the 16-bit logits is that of their fp32 copy
        flags = None
        if self.synthetic_acceptance is not None:
            uniforms, _ = _draw_noise(spec, target_logits.shape[-1], meta, target_logits.device,
                                      with_noise=False)
            flags = uniforms < self.synthetic_acceptance
        output, num_accepted = greedy_verify_kernel.greedy_verify(
            greedy_ids, spec.draft_token_ids, flags, spec.first_logits_indices, spec.num_draft_tokens_tensor,
            spec.cu_num_draft_tokens, width)
        return RejectionSamplerOutput(output, num_accepted, None, None, None)

    @staticmethod
    def _recover(probs: torch.Tensor, emit_rows: torch.Tensor, num_accepted: torch.Tensor,
                 spec: SpecDecodeMetadata, draft_probs: Optional[torch.Tensor], noise: torch.Tensor) -> torch.Tensor:
        """Random rows' emitted token: from norm(max(p - q, 0)) at the rejected position, from p at the
        bonus position. Only N rows of [V] are touched, not all T + N positions."""
        target = probs.index_select(0, emit_rows)  # [N, V]
        if spec.total_num_draft_tokens == 0:
            return target.div(noise).argmax(dim=-1)
        num_draft = spec.num_draft_tokens_tensor
        rejected = num_accepted < num_draft
        # Index of the rejected draft (clamped for rows that rejected nothing; `rejected` masks them).
        draft_index = (spec.cu_num_draft_tokens.to(torch.int64) - num_draft + num_accepted).clamp(
            max=spec.total_num_draft_tokens - 1)
        if draft_probs is None:
            # q is one-hot on the draft: max(p - q, 0) is p without the rejected token.
            rejected_token = spec.draft_token_ids.index_select(0, draft_index)
            residual = target.scatter(1, rejected_token[:, None], 0.0)
        else:
            draft = draft_probs.index_select(0, draft_index).float()
            residual = (target - draft).clamp(min=0.0)
        # A residual of all zeros means p == q up to rounding, where rejection has probability ~0;
        # falling back to p keeps the draw well defined.
        residual = torch.where((residual.sum(dim=-1, keepdim=True) > 0), residual, target)
        dist = torch.where(rejected[:, None], residual, target)
        # The exponential race is scale-free, so the residual needs no normalisation.
        return dist.div(noise).argmax(dim=-1)

    @staticmethod
    def _logprobs(raw_logprobs: torch.Tensor, output: torch.Tensor, num_accepted: torch.Tensor,
                  spec: SpecDecodeMetadata, num_logprobs: int) -> RejectionSamplerOutput:
        """The target's raw logprobs of every emitted token (position j of row i is logits row s_i + j)."""
        flat_tokens = output[spec.logits_row_ids, spec.logits_positions]  # -1 where nothing was emitted
        ids, lps, ranks = token_logprobs(raw_logprobs, flat_tokens.clamp(min=0), num_logprobs)
        shape = (spec.num_rows, spec.max_spec_len + 1)
        emitted = (output >= 0)
        padded_ids = torch.full((*shape, ids.shape[1]), -1, dtype=ids.dtype, device=ids.device)
        padded_lps = torch.full((*shape, lps.shape[1]), _NEG_INF, dtype=lps.dtype, device=lps.device)
        padded_ranks = torch.zeros(shape, dtype=ranks.dtype, device=ranks.device)
        padded_ids[spec.logits_row_ids, spec.logits_positions] = ids
        padded_lps[spec.logits_row_ids, spec.logits_positions] = lps
        padded_ranks[spec.logits_row_ids, spec.logits_positions] = ranks
        return RejectionSamplerOutput(
            output, num_accepted, torch.where(emitted[..., None], padded_ids, -1),
            torch.where(emitted[..., None], padded_lps, _NEG_INF), torch.where(emitted, padded_ranks, 0))


def _plain_greedy(meta: SamplingMetadata, token_bitmask: Optional[torch.Tensor]) -> bool:
    """Every row greedy with nothing that changes its logits or asks for logprobs."""
    return (meta.all_greedy and meta.max_num_logprobs is None and token_bitmask is None and meta.token_bitmask is None
            and meta.repetition_penalty is None and meta.frequency_penalty is None and meta.presence_penalty is None
            and meta.banned_rows is None and meta.bias_rows is None and meta.allowed_mask is None)


def num_banned_positions_for(num_generated: Sequence[int], min_tokens: Sequence[int],
                             device: torch.device) -> torch.Tensor:
    """Per row, how many leading positions min_tokens still bans EOS / stop ids at: a row that has
    generated g tokens (placeholders included) may stop only once g + j >= min_tokens."""
    host = torch.tensor([max(0, m - g) for g, m in zip(num_generated, min_tokens)], dtype=torch.int64)
    if device.type == "cuda":
        # Pinned + non_blocking: a pageable copy would make the host wait for the running forward.
        host = host.pin_memory()
    return host.to(device, non_blocking=True)
