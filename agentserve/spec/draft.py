"""Draft-model proposer: a smaller model with the target's vocabulary proposes k tokens per request.

The draft's KV layers live beside the target's over the *same page ids*: a request's block table
addresses both, so prefix caching, copy-on-write forks, preemption, swap and session residency move
the draft's KV with the target's (the runner runs every page copy and swap on both caches).

Per request, `Request.num_draft_computed_tokens` counts the leading positions whose draft KV is
written; it never runs ahead of the target's `num_computed_tokens` (positions the target rolled back
held rejected drafts). A proposal:
1. catches up: the draft computes the request's tokens from there to the last known one (the whole
   prompt the first time; after a verification step the target's new token, plus the last accepted
   draft when every draft was accepted) and samples d_1 from the last position;
2. runs k - 1 decode steps (CUDA graphs where captured), feeding d_j at position n - 1 + j.
It writes draft KV at positions up to n + k - 2, which the engine allocated before (lookahead slots
the verification step then uses for the target's KV too).
The inputs of these forwards that are known before the first draft is sampled (all but the ids of
steps 2..k without grammars) are built and copied to the device once per proposal (spec/draft_plan.py).

Greedy requests propose the draft's argmax. Random requests sample from the draft's temperature-
scaled distribution q and hand q to the rejection sampler (acceptance min(1, p/q)); a seeded
request draws from its own generator, so its proposals, and hence its output, repeat when its drafts do
(with a fixed k: a preemption that drops a proposal, or a step budget that trims k, changes the draws;
spec_dynamic's default gives seeded random rows no drafts, and so their tokens without speculation).
With a grammar, the draft proposes under a copy of the request's matcher (each step masked), so
every proposal is valid; the real matcher is not touched (spec/draft_grammar.py: a failing copy ends
that row's drafts, never the batch's proposal).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Protocol

import numpy as np
import torch

from agentserve.cache.kv_cache import KVCache, bytes_per_block
from agentserve.kernels.argmax import argmax_rows
from agentserve.kernels.token_bitmask import apply_token_bitmask
from agentserve.model.arch_config import ArchConfig
from agentserve.model.attention import ForwardMetadata
from agentserve.model.layers import rope_cos_sin_cache
from agentserve.model.fp8_lm_head import quantize_lm_head
from agentserve.model.loader import build_model
from agentserve.request import Request
from agentserve.sampling.sampler import top_k_top_p_min_p
from agentserve.spec.device_drafts import DRAFT_ON_DEVICE
from agentserve.spec.draft_grammar import accept_on_host, fill_masks, grammar_copies
from agentserve.spec.draft_inputs import DraftRun, PaddedInputs, build_decode_inputs, build_draft_inputs
from agentserve.spec.draft_plan import DecodeStepInputs, ProposalPlan, plan_proposal
from agentserve.spec.draft_vocab import fit_draft_vocabulary

# Catch-ups of at most this many tokens per request run as one replay of a catch-up graph (or, without
# graphs, as that many decode steps); longer ones (a prompt) as ragged prefill forwards.
MAX_DECODE_CATCH_UP = 4
_DRAFT_SEED_OFFSET = 0x5EED  # a seeded request's draft stream differs from its sampling stream


class PaddedRunner(Protocol):
    """Graphs over runs padded to q tokens (worker/verify_graphs.py's VerifyGraphs): hidden states."""

    def padded_size(self, bs: int, q: int) -> Optional[int]: ...

    def run(self, inputs: PaddedInputs, q: int) -> torch.Tensor: ...


class DecodeRunner(Protocol):
    """Captured decode graphs (worker/cuda_graph.py's DecodeGraphs) over the draft model."""

    def padded_size(self, bs: int) -> Optional[int]: ...

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
            block_tables: torch.Tensor, seq_lens: torch.Tensor, max_seq_len: int) -> torch.Tensor: ...


class ContinuationRunner(Protocol):
    """Captured greedy continuations (worker/continuation_graphs.py's ContinuationGraphs)."""

    def run(self, rows: list[int], bases: list[int], last_tokens: list[int], block_tables: list[list[int]],
            num_tokens: int, emitted: torch.Tensor, num_accepted: torch.Tensor, bound: int
            ) -> Optional[torch.Tensor]: ...


def _truncate(scaled: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """The requests' own top-k / top-p / min-p on the draft's scaled logits: q then puts its mass where
    the target's p can (any q keeps the output exact; one close to p is accepted more often)."""
    params = [r.sampling_params for r in requests]
    device = scaled.device
    top_k = torch.tensor([p.top_k for p in params], device=device) if any(p.top_k > 0 for p in params) else None
    top_p = torch.tensor([p.top_p for p in params], device=device) if any(p.top_p < 1 for p in params) else None
    min_p = torch.tensor([p.min_p for p in params], device=device) if any(p.min_p > 0 for p in params) else None
    return top_k_top_p_min_p(scaled, top_k, top_p, min_p)


def _device_tables(host_tables: np.ndarray, device: torch.device) -> torch.Tensor:
    t = torch.from_numpy(host_tables.astype(np.int32))
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


class DraftModel:
    def __init__(self, arch: ArchConfig, path: Optional[Path], dtype: torch.dtype, device: torch.device,
                 load_format: str, seed: int, max_model_len: int, block_size: int, max_tokens_per_forward: int,
                 target_vocab_size: int, quantization: Optional[str] = None) -> None:
        self.arch = arch
        self.vocab_size = target_vocab_size  # its logits' width: the target's ids (spec/draft_vocab.py)
        self.dtype = dtype
        self.device = device
        self.block_size = block_size
        self.max_tokens_per_forward = max_tokens_per_forward
        self.max_model_len = max_model_len
        # Its own quantization (draft_quantization, or its checkpoint's quantization_config), not the
        # target's: an FP8 draft under a bf16 target and the reverse are both valid.
        self.model = build_model(arch, dtype, device, path, load_format, seed, quantization=quantization)
        # Unseeded requests' proposals: the engine's --seed makes them reproducible too (a stream apart
        # from the target's sampling generator).
        self.sampling_generator = torch.Generator(device=device).manual_seed(seed + _DRAFT_SEED_OFFSET)
        if quantization == "fp8":
            quantize_lm_head(self.model.lm_head)  # proposals are verified: the head may be FP8 too
        fit_draft_vocabulary(self.model, target_vocab_size)
        self.model.set_rope_cache(rope_cos_sin_cache(arch.head_dim, arch.rope_theta, arch.rope_scaling,
                                                     max_model_len, device))
        self.cache: Optional[KVCache] = None
        self.graphs: Optional[DecodeRunner] = None
        self.catch_up_graphs: Optional[PaddedRunner] = None
        self.continuation_graphs: Optional[ContinuationRunner] = None

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def block_bytes(self) -> int:
        a = self.arch
        return bytes_per_block(a.num_layers, self.block_size, a.num_kv_heads, a.head_dim, self.dtype)

    def allocate_cache(self, num_blocks: int, num_swap_blocks: int) -> KVCache:
        a = self.arch
        self.cache = KVCache(a.num_layers, num_blocks, self.block_size, a.num_kv_heads, a.head_dim, self.dtype,
                             self.device, num_swap_blocks=num_swap_blocks)
        return self.cache

    def _kv_layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        assert self.cache is not None, "the runner allocates the draft's cache before any forward"
        return self.cache.layers

    def release(self) -> None:
        self.graphs = None
        self.catch_up_graphs = None
        self.continuation_graphs = None
        if self.cache is not None:
            self.cache.release()
        self.model = self.model.to("meta")

    # --- proposing ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def propose(self, requests: list[Request], num_tokens: list[int], keep_on_device: bool = False
                ) -> list[tuple[list[int], Optional[torch.Tensor], Optional[torch.Tensor]]]:
        """Up to num_tokens[i] drafts for request i (each due for a decode, with page slots up to
        position num_tokens - 2 + k), q at each draft for random requests, and the drafts on the
        device when they were left there. Without grammars the sampled drafts stay on the device until
        the end (one host sync per proposal); with `keep_on_device` and the same count for every row,
        not even that: the host gets DRAFT_ON_DEVICE placeholders (spec/device_drafts.py). A
        constrained request's matcher copy needs each token on the host before the next mask."""
        grammars, failed = grammar_copies(requests)
        on_host = any(g is not None for g in grammars) or bool(failed)
        temps = [r.sampling_params.temperature for r in requests]
        starts = [min(r.num_draft_computed_tokens, r.num_computed_tokens) for r in requests]
        # Every forward's inputs that are known now, in one copy (spec/draft_plan.py).
        plan = plan_proposal(requests, starts, num_tokens, not on_host, self._padded_catch_up(requests, starts),
                             self.block_size, self.max_model_len, self.device)
        logits = self._catch_up(requests, starts, plan)
        host_tables, tables = plan.host_tables, plan.tables
        drafts: list[list[int]] = [[] for _ in requests]
        probs: list[list[torch.Tensor]] = [[] for _ in requests]
        steps: list[tuple[list[int], torch.Tensor]] = []  # device-resident drafts: (rows, tokens)
        active = list(range(len(requests)))
        step = 0
        while True:
            bitmask, unfillable = fill_masks([grammars[i] for i in active], self.vocab_size)
            failed.update(active[row] for row in unfillable)
            tokens, q = self.sample(logits, [requests[i] for i in active], [temps[i] for i in active], bitmask)
            step += 1
            for row, i in enumerate(active):
                if q is not None and temps[i] > 0:
                    probs[i].append(q[row])
            if on_host:
                still = accept_on_host(active, tokens.tolist(), drafts, grammars, num_tokens, failed)
            else:
                steps.append((active, tokens))
                still = [i for i in active if step < num_tokens[i]]
            if not still:
                break
            planned = plan.step(step, still)
            if on_host:
                inputs: object = [drafts[i][-1] for i in still]
            elif len(still) == len(active):
                inputs = tokens
            elif planned is not None:
                # The plan saw the same rows stop as `still` did, so it holds their keep index.
                assert planned.keep_index is not None
                inputs = tokens.index_select(0, planned.keep_index)
            else:
                keep = torch.tensor([row for row, i in enumerate(active) if step < num_tokens[i]], device=self.device)
                inputs = tokens.index_select(0, keep)
            logits = self._decode(requests, still, host_tables, tables, inputs, step, planned)
            active = still
        on_device: Optional[torch.Tensor] = None
        if steps and keep_on_device and all(len(rows) == len(requests) for rows, _ in steps):
            # Every row ran every step (the same count each): [R, k], row i's drafts in order.
            on_device = torch.stack([tokens for _, tokens in steps], dim=1)
            for i in range(len(requests)):
                drafts[i] = [DRAFT_ON_DEVICE] * len(steps)
        elif steps:
            self._collect(steps, drafts)
        out: list[tuple[list[int], Optional[torch.Tensor], Optional[torch.Tensor]]] = []
        for i, req in enumerate(requests):
            n = req.num_tokens
            # Written: the catch-up through position n - 1, then d_1 .. d_{m-1} at n .. n + m - 2.
            req.num_draft_computed_tokens = n + max(len(drafts[i]), 1) - 1
            q_rows = torch.stack(probs[i][:len(drafts[i])]) if probs[i] and drafts[i] else None
            out.append((drafts[i], q_rows, on_device[i] if on_device is not None else None))
        return out

    @staticmethod
    def _collect(steps: list[tuple[list[int], torch.Tensor]], drafts: list[list[int]]) -> None:
        """The device-resident drafts to the host, in one copy."""
        flat = torch.cat([tokens for _, tokens in steps]).tolist()
        at = 0
        for rows, tokens in steps:
            for i in rows:
                drafts[i].append(flat[at])
                at += 1

    def _padded_catch_up(self, requests: list[Request], starts: list[int]) -> Optional[int]:
        """q of the catch-up as one padded-graph replay, or None where no catch-up graph runs it."""
        longest = max(r.num_tokens - s for r, s in zip(requests, starts))
        graphs = self.catch_up_graphs
        if 1 < longest and graphs is not None and graphs.padded_size(len(requests), longest) is not None:
            return longest
        return None

    def _catch_up(self, requests: list[Request], starts: list[int], plan: ProposalPlan) -> torch.Tensor:
        """Draft logits [R, V] at each request's last known token, after computing the draft KV of
        every known token not yet written (from position starts[i])."""
        longest = max(r.num_tokens - s for r, s in zip(requests, starts))
        if plan.catch_up_padded is not None:
            assert self.catch_up_graphs is not None
            hidden = self.catch_up_graphs.run(plan.catch_up_padded, longest)
            return self.model.compute_logits(hidden.index_select(0, plan.catch_up_padded.last_index)).float()
        if plan.catch_up_decode is not None:  # one token per request
            c = plan.catch_up_decode
            assert c.ids is not None  # a catch-up's ids are known on the host (planned with it)
            return self.forward_tokens(c.ids, c.positions, c.slots, plan.tables, c.seq_lens, c.max_seq_len)
        if longest <= MAX_DECODE_CATCH_UP:
            host_tables = plan.host_tables
            logits: Optional[torch.Tensor] = None
            for t in range(longest):
                # Right-aligned: every request feeds its last token in the last of these steps.
                rows = [i for i, (r, s) in enumerate(zip(requests, starts)) if r.num_tokens - longest + t >= s]
                positions = [requests[i].num_tokens - longest + t for i in rows]
                ids, pos, slots, seq_lens = build_decode_inputs(
                    [requests[i].all_token_ids[p] for i, p in zip(rows, positions)], positions, host_tables[rows],
                    self.block_size, self.device)
                logits = self.forward_tokens(ids, pos, slots, _device_tables(host_tables[rows], self.device),
                                              seq_lens, max(positions) + 1)
            assert logits is not None and logits.shape[0] == len(requests)
            return logits
        logits = self._prefill(requests, starts)
        assert logits is not None
        return logits

    def _prefill(self, requests: list[Request], starts: list[int], ends: Optional[list[int]] = None
                 ) -> Optional[torch.Tensor]:
        """Ragged forwards of at most max_tokens_per_forward tokens over each request's tokens from
        starts[i] to ends[i]. Without `ends`: to its last known token, and the logits there [R, V] come
        from the forward that reaches it (every row computes at least that token); with `ends`: the KV
        only, no logits (None)."""
        out = (torch.empty((len(requests), self.vocab_size), dtype=torch.float32, device=self.device)
               if ends is None else None)
        stop = list(ends) if ends is not None else [r.num_tokens for r in requests]
        pos = list(starts)
        while any(p < e for p, e in zip(pos, stop)):
            budget = self.max_tokens_per_forward
            runs: list[DraftRun] = []
            finishing: list[int] = []  # rows whose last run ends at their end
            for i, r in enumerate(requests):
                if pos[i] >= stop[i] or budget <= 0:
                    continue
                end = min(stop[i], pos[i] + budget)
                runs.append(DraftRun(r.all_token_ids[pos[i]:end], pos[i], r.block_table))
                finishing.append(i if end == stop[i] else -1)
                budget -= end - pos[i]
                pos[i] = end
            ids, positions, meta, last = build_draft_inputs(runs, self.block_size, self.device)
            hidden = self.model(ids, positions, self._kv_layers(), meta)
            rows = [j for j, i in enumerate(finishing) if i >= 0]
            if rows and out is not None:
                index = torch.tensor(rows, device=self.device)
                logits = self.model.compute_logits(hidden.index_select(0, last.index_select(0, index)))
                out[torch.tensor([finishing[j] for j in rows], device=self.device)] = logits.float()
        return out

    @torch.inference_mode()
    def prefill_computed(self, requests: list[Request]) -> None:
        """The draft's KV of every token the target has computed (or has just been launched to compute),
        queued now: run right behind a prefill chunk, the draft's share of the prompt overlaps the target's
        on the host and no longer delays the first proposal after the first token (Speculation.after_launch
        in engine/speculation.py)."""
        rows = [r for r in requests if r.num_draft_computed_tokens < r.num_computed_tokens]
        if not rows:
            return
        self._prefill(rows, [r.num_draft_computed_tokens for r in rows], [r.num_computed_tokens for r in rows])
        for r in rows:
            r.num_draft_computed_tokens = r.num_computed_tokens

    def _decode(self, requests: list[Request], rows: list[int], host_tables: np.ndarray, tables: torch.Tensor,
                inputs: object, step: int, planned: Optional[DecodeStepInputs]) -> torch.Tensor:
        """One decode step of requests[rows]: draft d_step of each at position n - 1 + step (`inputs`:
        host ids, or the previous step's sampled ids on the device; `planned`: the step's other
        inputs, already on the device)."""
        if planned is not None and isinstance(inputs, torch.Tensor):
            if planned.row_index is not None:
                tables = tables.index_select(0, planned.row_index)
            return self.forward_tokens(inputs, planned.positions, planned.slots, tables, planned.seq_lens,
                                        planned.max_seq_len)
        positions = [requests[i].num_tokens - 1 + step for i in rows]
        host_ids = inputs if isinstance(inputs, list) else [0] * len(rows)
        ids, pos, slots, seq_lens = build_decode_inputs(host_ids, positions, host_tables[rows], self.block_size,
                                                        self.device)
        if isinstance(inputs, torch.Tensor):
            ids = inputs
        if len(rows) < tables.shape[0]:
            tables = tables.index_select(0, torch.tensor(rows, device=self.device))
        return self.forward_tokens(ids, pos, slots, tables, seq_lens, max(positions) + 1)

    def forward_padded(self, inputs: PaddedInputs, q: int, max_seq_len: int) -> torch.Tensor:
        """Hidden states [R * q, H] of runs laid out q tokens each: a catch-up graph replay where one is
        captured for the batch size, else an eager forward (`max_seq_len`: an upper bound of the
        context lengths, for the eager kernels)."""
        rows = inputs.seq_lens.shape[0]
        graphs = self.catch_up_graphs
        if graphs is not None and graphs.padded_size(rows, q) is not None:
            return graphs.run(inputs, q)
        meta = ForwardMetadata(slot_mapping=inputs.slot_mapping, block_tables=inputs.block_tables,
                               query_start_loc=torch.arange(rows + 1, dtype=torch.int32, device=self.device) * q,
                               seq_lens=inputs.seq_lens, max_query_len=q, max_seq_len=max_seq_len)
        return self.model(inputs.input_ids, inputs.positions, self._kv_layers(), meta)

    def forward_tokens(self, ids: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor, tables: torch.Tensor,
                        seq_lens: torch.Tensor, max_seq_len: int) -> torch.Tensor:
        """Logits of one token per row: a decode-graph replay where one is captured for the batch size,
        else an eager forward."""
        graphs = self.graphs
        if graphs is not None and graphs.padded_size(ids.shape[0]) is not None:
            return graphs.run(ids, pos, slots, tables, seq_lens, max_seq_len).float()
        meta = ForwardMetadata(slot_mapping=slots, block_tables=tables,
                               query_start_loc=torch.arange(ids.shape[0] + 1, dtype=torch.int32, device=self.device),
                               seq_lens=seq_lens.to(torch.int32), max_query_len=1, max_seq_len=max_seq_len)
        hidden = self.model(ids, pos, self._kv_layers(), meta)
        return self.model.compute_logits(hidden).float()

    def sample(self, logits: torch.Tensor, requests: list[Request], temps: list[float],
                bitmask: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(tokens [R], q [R, V] or None when every row is greedy); `bitmask`: the rows' grammar masks
        (draft_grammar.fill_masks), None when no row is constrained."""
        logits = logits.float().contiguous()
        if bitmask is not None:
            apply_token_bitmask(logits, bitmask.to(self.device, non_blocking=True))
        greedy = argmax_rows(logits)
        if all(t == 0 for t in temps):
            return greedy, None
        temperature = torch.tensor([t if t > 0 else 1.0 for t in temps], device=self.device)
        q = _truncate(logits / temperature[:, None], requests).softmax(dim=-1)
        noise = torch.empty_like(q).exponential_(generator=self.sampling_generator)
        for row, req in enumerate(requests):
            seed = req.sampling_params.seed
            if temps[row] > 0 and seed is not None:
                if req.draft_generator is None:
                    req.draft_generator = torch.Generator(device=self.device).manual_seed(
                        seed + req.index + _DRAFT_SEED_OFFSET)
                noise[row].exponential_(generator=req.draft_generator)
        sampled = argmax_rows(q.div(noise))
        is_random = torch.tensor([t > 0 for t in temps], device=self.device)
        return torch.where(is_random, sampled, greedy), q
