"""Speculative decoding on the engine's side: how many tokens to propose this step, and proposing them.

Dynamic speculation. A verification step with k drafts per row emits E(k) = (1 - a^(k+1)) / (1 - a)
tokens per row on average, where a is the measured per-position acceptance (accepted drafts over
accepted drafts plus rejections), and costs t(B(k+1)) + k c t(B) against t(B) for a plain decode of
B rows: t(T) = 1 + T / RIDGE_TOKENS models a step as memory-bound (flat) until the batch's tokens
make the matmuls compute-bound (linear), and c is the draft's cost relative to the target (its
parameter share; ~0 for n-gram lookup). The step speculates with the k of the best E(k) / cost, and
not at all unless that beats plain decoding by MIN_GAIN: at large batch k falls to 0, and the step is
then a plain decode (CUDA graphs, async scheduling), so speculation never costs throughput there.

Proposals never break an output constraint: the draft model proposes under a copy of the matcher,
and an n-gram proposal is cut at its first token the matcher refuses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Protocol

import numpy as np

from agentserve.cache.device_ops import CopyBlocks
from agentserve.config import SpecConfig
from agentserve.spec.device_drafts import DRAFT_ON_DEVICE
from agentserve.engine.output import InflightStep
from agentserve.request import Request
from agentserve.spec.continuation import PendingProposal, can_continue, continue_proposal
from agentserve.spec.ngram import NgramProposer

if TYPE_CHECKING:
    from agentserve.engine.engine import Engine

# Batched tokens at which a step stops being bound by reading the weights (H200, 7-8B bf16: a
# 256-row decode step takes ~2.3x a 1-row step, a 512-row step ~4x).
RIDGE_TOKENS = 128
MIN_GAIN = 1.1
PRIOR_ACCEPTANCE = 0.6  # until measured
NGRAM_COST = 0.02  # host-side lookup, relative to a target step


class SpecProposer(Protocol):
    """What Engine.step asks before each schedule (see Engine.spec_proposer)."""

    def num_tokens_for_step(self, batch_size: int) -> int:
        """k for the coming step (0: no speculation, the step runs in the async order)."""
        ...

    def __call__(self, requests: list[Request], num_tokens: int) -> None:
        """Sets spec_token_ids (and spec_draft_probs) on the requests due for a decode."""
        ...

    def after_launch(self, step: InflightStep) -> None:
        """Called with every launched step, before its results are read (a draft proposal may be queued
        behind a verification on the device: spec/continuation.py)."""
        ...

    def release(self) -> None:
        """Drops what it holds on the device and every request it names (Engine.close, and an engine gone idle)."""
        ...


def expected_tokens(acceptance: float, k: int) -> float:
    if acceptance >= 1.0:
        return float(k + 1)
    return (1.0 - acceptance ** (k + 1)) / (1.0 - acceptance)


def choose_num_tokens(acceptance: float, batch_size: int, max_k: int, draft_cost: float) -> int:
    def step_time(tokens: int) -> float:
        return 1.0 + tokens / RIDGE_TOKENS

    plain = step_time(batch_size)
    best_k, best_gain = 0, MIN_GAIN
    for k in range(1, max_k + 1):
        cost = (step_time(batch_size * (k + 1)) + k * draft_cost * plain) / plain
        gain = expected_tokens(acceptance, k) / cost
        if gain > best_gain:
            best_k, best_gain = k, gain
    return best_k


class Speculation:
    """The engine's SpecProposer for the configured method (n-gram lookup or a draft model)."""

    def __init__(self, engine: "Engine", config: SpecConfig) -> None:
        self.engine = engine
        self.config = config
        self.ngram: Optional[NgramProposer] = None
        if config.method == "ngram":
            self.ngram = NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max,
                                       config.num_speculative_tokens, engine.max_model_len)
            self.draft_cost = NGRAM_COST
        else:
            draft = engine.runner.draft
            assert draft is not None, "speculative_method='draft_model' without a loaded draft model"
            target_params = sum(p.numel() for p in engine.runner.model.parameters())
            self.draft_cost = draft.num_parameters / target_params
        self._seen = (0, 0)  # (accepted, rejections) already folded into the estimate
        self.acceptance = PRIOR_ACCEPTANCE
        # Most tokens proposed per request and step, and whether k adapts (benchmarks change them).
        self.max_num_tokens = config.num_speculative_tokens
        self.dynamic = config.spec_dynamic
        # Proposals queued on the device behind each verification (spec/continuation.py): rank 0 runs
        # the draft, and with tensor parallelism the verification's inputs travel from the host.
        self.continues = (config.spec_device_continuation and self.ngram is None
                          and engine.runner.parallel is None)
        self.pending: Optional[PendingProposal] = None
        self._step_k = 0
        self._coming_k = 0  # k chosen for the step being scheduled (0: it does not speculate)
        self._reserved_for_continuation: set[str] = set()  # request ids with pages up to P + 2k

    def _update_acceptance(self) -> None:
        m = self.engine.metrics
        accepted = m.spec_num_accepted_tokens - self._seen[0]
        rejections = m.spec_num_rejected_rows - self._seen[1]
        if accepted + rejections > 0:
            measured = accepted / (accepted + rejections)
            # Weighted by the trials: a busy step moves the estimate more than a single row.
            weight = min(1.0, (accepted + rejections) / 64)
            self.acceptance += weight * (measured - self.acceptance)
        self._seen = (m.spec_num_accepted_tokens, m.spec_num_rejected_rows)

    def num_tokens_for_step(self, batch_size: int) -> int:
        self._coming_k = self._num_tokens_for_step(batch_size)
        return self._coming_k

    def _num_tokens_for_step(self, batch_size: int) -> int:
        if batch_size == 0:
            return 0
        if not self.dynamic:
            return self.max_num_tokens
        self._update_acceptance()
        k = choose_num_tokens(self.acceptance, batch_size, self.max_num_tokens, self.draft_cost)
        if not k:
            self.pending = None  # the step is a plain decode: nothing adopts the queued drafts
        return k

    def __call__(self, requests: list[Request], num_tokens: int) -> None:
        pending, self.pending = self.pending, None
        self._step_k = num_tokens
        self._reserved_for_continuation.clear()
        caps = [self._cap(r, num_tokens) for r in requests]
        rows = [(r, k) for r, k in zip(requests, caps) if k > 0]
        if not rows:
            return
        if self.ngram is not None:
            for req, k in rows:
                draft = self.ngram.propose_one(np.asarray(req.all_token_ids), k).tolist()
                req.spec_token_ids = _valid_prefix(req, draft)
                req.spec_draft_probs = None
                req.spec_token_ids_device = None
            return
        rows = self._reserve_lookahead(rows)
        if not rows:
            return
        runner = self.engine.runner
        draft_model = runner.draft
        assert draft_model is not None
        # Drafts stay on the device into a verification-graph step (spec/device_drafts.py); with
        # tensor parallelism the step's inputs travel to the other ranks from the host.
        keep_on_device = runner.verify_graphs is not None and runner.parallel is None
        if pending is not None:
            rows = self._adopt(pending, rows)
            if not rows:
                return
        proposals = draft_model.propose([r for r, _ in rows], [k for _, k in rows], keep_on_device)
        for (req, _), (tokens, probs, on_device) in zip(rows, proposals):
            req.spec_token_ids = tokens
            req.spec_draft_probs = probs
            req.spec_token_ids_device = on_device

    def _adopt(self, pending: PendingProposal, rows: list[tuple[Request, int]]) -> list[tuple[Request, int]]:
        """Gives each row the drafts queued for it where the continuation assumed its state; returns
        the rows left to propose for from the host."""
        left = []
        for req, k in rows:
            taken = pending.take(req, k)
            if taken is None:
                left.append((req, k))
                continue
            drafts, probs = taken
            m = drafts.shape[0]
            req.spec_token_ids = [DRAFT_ON_DEVICE] * m
            req.spec_token_ids_device = drafts
            req.spec_draft_probs = probs
            req.num_draft_computed_tokens = req.num_tokens + m - 1  # as DraftModel.propose counts them
            self.engine.metrics.spec_num_continued_proposals += 1
        return left

    def after_launch(self, step: InflightStep) -> None:
        self.pending = None
        # Read once, here: an engine gone idle keeps no ids of finished requests.
        reserved, self._reserved_for_continuation = self._reserved_for_continuation, set()
        draft_model = self.engine.runner.draft
        if draft_model is None:  # n-gram lookup
            return
        if self._coming_k:
            # The draft's KV of the prompt chunks just launched, queued right behind them: otherwise the
            # first proposal after the first token computes the whole prompt in the draft from the host
            # (~21 ms on the H200 for a 128-token prompt, FP8 1B draft: benchmarks/NOTES.md). Not at batch
            # sizes where speculation is off (k = 0): a draft prefill there would cost throughput.
            draft_model.prefill_computed([c.request for c in step.chunks if not c.spec_token_ids
                                          and not c.request.is_finished
                                          and c.request.num_computed_tokens - c.num_tokens < c.request.num_prompt_tokens])
        verified = step.handle.verified
        if not self.continues or verified is None:
            return
        requests, rows, counts = [], [], []
        sampling = [c for c in step.chunks if c.num_sampled]
        for row, chunk in enumerate(sampling):
            req = chunk.request
            # Reserved for a continuation this step: can_continue(req) held there.
            if chunk.spec_token_ids and not req.is_finished and req.request_id in reserved:
                requests.append(req)
                rows.append(row)
                counts.append(len(chunk.spec_token_ids))
        if requests:
            emitted, num_accepted = verified
            self.pending = continue_proposal(draft_model, requests, rows, counts, self._step_k, emitted, num_accepted)

    def release(self) -> None:
        self.pending = None

    def _cap(self, request: Request, k: int) -> int:
        """k within max_tokens (the row never samples past it) and the context length."""
        room = min(request.max_tokens - request.num_output_tokens - 1, self.engine.max_model_len - request.num_tokens)
        if request.num_output_placeholders or request.bad_words_token_ids:
            return 0  # bad words: each position's bans depend on the drafts before it (sampling/bad_words.py)
        params = request.sampling_params
        if self.dynamic and params.temperature > 0 and params.seed is not None:
            # A seeded row's draws follow its drafts (k uniforms, then the noise), and dynamic k follows the
            # batch size and everyone's acceptance: speculating, the same seed would give other tokens as
            # the traffic changes. Without drafts it samples exactly as without speculation.
            return 0
        return max(0, min(k, room))

    def _reserve_lookahead(self, rows: list[tuple[Request, int]]) -> list[tuple[Request, int]]:
        """Page slots for the positions the draft writes (n - 1 .. n + k - 2; the verification step
        uses them for the target's KV too). A request that cannot get them does not speculate. Page
        copies this needs, and any queued before them, run now: the draft writes next."""
        kv, scheduler = self.engine.kv, self.engine.scheduler
        kept = []
        for req, k in rows:
            # A continuation queued behind the verification writes draft KV up to P + 2k (P = n - 1).
            room = min(2 * k + 1, self.engine.max_model_len - req.num_computed_tokens)
            copies = kv.allocate_slots(req, room) if self.continues and can_continue(req) and room > k else None
            if copies is not None:
                self._reserved_for_continuation.add(req.request_id)
            else:
                copies = kv.allocate_slots(req, k)
            if copies is None:
                continue
            scheduler.queue_device_ops([CopyBlocks(src, dst) for src, dst in copies])
            kept.append((req, k))
        self.engine.runner.execute_device_ops(scheduler.take_device_ops())
        return kept


def _valid_prefix(request: Request, draft: list[int]) -> list[int]:
    """The longest prefix of `draft` the request's grammar accepts (the matcher is left as it was)."""
    grammar = request.grammar
    if grammar is None or not draft:
        return draft
    matcher = grammar.matcher
    before = matcher.num_tokens
    try:
        accepted = matcher.accept_tokens(draft)
    except Exception:  # noqa: BLE001 - that request's matcher (a backend limit): not the batch's
        # No proposal, and the matcher back where it was: the request meets the failure where its own
        # sequence gets to it (its next mask or token, failed alone there), as without speculation.
        matcher.rollback(matcher.num_tokens - before)
        return []
    if accepted:
        matcher.rollback(accepted)
    return draft[:accepted]
