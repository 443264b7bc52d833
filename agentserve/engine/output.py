"""From a processed step to the requests' tokens and the outputs the engine emits.

`update_from_output` (vLLM's name) takes each sampling row's emitted tokens: a row that verified k
speculative tokens keeps the accepted ones (sampling/rejection.py decides, keeping the target's
distribution exactly) plus the recovered or bonus token after them,
appended one by one through the stop checks, the grammar, the detokenizer and logprobs; the KV of the
rejected tokens is not part of the sequence, so `num_computed_tokens` goes back by their count (their
slots are overwritten by later steps). A failure traced to one request fails it alone.
"""

from __future__ import annotations

import logging
import time
import weakref
from typing import TYPE_CHECKING, Optional, Sequence, Union

from agentserve.engine.constraints import ConstraintManager
from agentserve.engine.failures import STEP_FAILED, log_step_failure, request_failure_message
from agentserve.errors import FailureKind
from agentserve.grammar.interface import GrammarError
from agentserve.outputs import (CompletionOutput, Logprob, PositionLogprobs, RequestMetrics,
                                RequestOutput)
from agentserve.request import Request, RequestStatus
from agentserve.worker.launched_step import LaunchedStep, StepResult
from agentserve.worker.model_runner import ScheduledChunk
from agentserve.worker.prompt_logprobs import PromptScores

if TYPE_CHECKING:
    from agentserve.engine.engine import Engine

logger = logging.getLogger(__name__)


class InflightStep:
    """A launched step: what was scheduled, and the handle its sampled ids come back through."""

    def __init__(self, chunks: list[ScheduledChunk], handle: LaunchedStep, overlappable: bool) -> None:
        self.chunks = chunks
        self.handle = handle
        # False when the step after this one must not be scheduled before this one is processed.
        self.overlappable = overlappable
        self.num_appended = 0
        # Processed once: a step with grammar rows processes the one before it early (inside its own
        # launch, see launch.py), and the engine's regular call then gets the same outputs back.
        self.processed = False
        self.touched: set[str] = set()


class OutputProcessor:
    """Appends sampled tokens, finishes and fails requests, and assembles RequestOutputs. Works on
    the engine's queues, pages, metrics and request tables through a weak proxy: a strong reference
    back would make engine <-> processor a cycle, and an engine dropped without close() would keep
    its KV pool until the cycle collector happened to run (a second engine then found the device full)."""

    def __init__(self, engine: "Engine") -> None:
        self.engine = weakref.proxy(engine)
        self.failed: set[str] = set()  # caller ids failed inside the engine, to report at the next step
        # The tokenizer's own EOS ends an output with stop_reason None; the generation config's other EOS
        # ids (Llama 3's <|eom_id|>, Qwen's <|endoftext|>) are stop tokens in vLLM, reported by id.
        self.tokenizer_eos_id: Optional[int] = engine.tokenizer.eos_token_id if engine.tokenizer is not None else None

    # --- one step's samples -------------------------------------------------------------------------
    def update_from_output(self, step: InflightStep) -> set[str]:
        """Appends a launched step's sampled tokens (waiting for them), checks stops, forks. Returns
        the caller ids that have an output to emit (only finished ones unless emit_unfinished).
        A second call for the same step does nothing and returns the first call's ids."""
        if step.processed:
            return step.touched
        step.processed = True
        try:
            result = step.handle.result()
        except Exception as e:  # noqa: BLE001 - the device failed this step: its requests fail, no others
            log_step_failure("step result", e, [c.request.request_id for c in step.chunks])
            for chunk in step.chunks:
                self.fail_request(chunk.request, STEP_FAILED)
            return set()
        if step.handle.prompt_scores is not None:
            self._record_prompt_logprobs(step.handle.prompt_scores)
        touched: set[str] = set()
        engine = self.engine  # read once: every attribute through the weak proxy costs a lookup
        emit_all = engine.emit_unfinished
        forks = engine.pending_forks
        max_model_len = engine.max_model_len
        sampled = result.sampled
        now = time.monotonic()
        row = -1
        appended = 0
        for chunk in step.chunks:
            if not chunk.num_sampled:
                continue
            row += 1
            req = chunk.request
            if req.status >= RequestStatus.FINISHED_STOPPED:
                continue  # aborted, or finished by the step before: these tokens were computed in vain
            req.num_output_placeholders -= 1
            try:
                if forks and req.request_id in forks:
                    # n > 1: the siblings fork from the leader's prompt pages as soon as its prompt is in,
                    # before its token is appended: a leader that finishes on that token (max_tokens=1,
                    # an EOS, a stop) gives its pages back, and siblings not forked by then never ran.
                    self._fork_siblings(req)
                tokens = sampled[row]
                if len(tokens) == 1 and not chunk.spec_token_ids:
                    self._append_plain(req, tokens[0], result, row, now, max_model_len)
                    appended += 1
                else:
                    appended += self._append_row(req, chunk, result, row, now)
            except Exception as e:  # noqa: BLE001 - detokenizer, matcher, stop checks: this request's own
                if isinstance(e, GrammarError):  # its constraint reached a limit of the backend's
                    self.fail_request(req, request_failure_message("in its output constraint", req, e),
                                      FailureKind.INVALID_REQUEST)
                else:
                    self.fail_request(req, request_failure_message("while processing its output", req, e))
            if emit_all or req.status >= RequestStatus.FINISHED_STOPPED:
                touched.add(req.parent_id)
        step.num_appended += appended
        engine.metrics.generation_tokens_total += appended
        step.touched = touched
        return touched

    def _append_plain(self, req: Request, token: int, result: StepResult, row: int, now: float,
                      max_model_len: int) -> None:
        """A row with one sampled token and no speculative tokens (a decode, a prompt's last chunk):
        what _append_row does for it, without the speculation bookkeeping, since at a large batch
        almost every row is one. `_check_stop` runs only when it can act: with a detokenizer (stop strings) or a
        grammar, on an EOS or stop id (ignore_eos is decided there), or at a length limit."""
        req.clear_proposal()
        self._record_token(req, token, result, row, 0, now)
        if (req.detokenizer is not None or req.grammar is not None or token in req.eos_token_ids
                or token in req.sampling_params.stop_token_ids or len(req.output_token_ids) >= req.max_tokens
                or len(req.all_token_ids) >= max_model_len):
            self._check_stop(req, token)

    def _append_row(self, req: Request, chunk: ScheduledChunk, result: StepResult, row: int, now: float) -> int:
        """Appends the row's accepted tokens one by one until one finishes the request; rolls back
        the computed count by the rejected speculative tokens. Returns the tokens appended."""
        sampled = result.sampled[row]
        spec = chunk.spec_token_ids
        # A verification row emits its accepted drafts and one more token (the rejection sampler's
        # layout); a plain row emits its one sample.
        num_accepted = len(sampled) - 1
        assert 0 <= num_accepted <= len(spec), f"{req.request_id}: {len(sampled)} tokens for {len(spec)} drafts"
        req.clear_proposal()  # proposals are for one step; the proposer makes new ones
        self.engine.metrics.record_spec_row(len(spec), num_accepted)
        # The launch counted all the row's tokens as computed; the rejected ones are not the sequence's.
        req.num_computed_tokens -= len(spec) - num_accepted
        # The draft's KV past the accepted tokens holds rejected drafts: never count it as written.
        req.num_draft_computed_tokens = min(req.num_draft_computed_tokens, req.num_computed_tokens)
        appended = 0
        for position in range(num_accepted + 1):
            self._record_token(req, sampled[position], result, row, position, now)
            self._check_stop(req, sampled[position])
            appended += 1
            if req.is_finished:
                break
        return appended

    def _record_token(self, req: Request, token: int, result: StepResult, row: int, position: int,
                      now: float) -> None:
        """Appends a sampled token (and its logprobs) to the request; stops are checked apart."""
        timing = req.timing
        if timing.first_token is None:
            timing.first_token = now
            # vLLM counts a sequence's prompt when its prefill completes (each of n's, none of a request
            # refused or dropped before it ran).
            self.engine.metrics.prompt_tokens_total += req.num_prompt_tokens
        timing.last_token = now
        req.output_token_ids.append(token)
        req.all_token_ids.append(token)
        req.pending_token_ids.append(token)
        if req.logprobs is not None and result.logprobs is not None:
            assert result.logprob_ids is not None and result.ranks is not None
            self._record_logprobs(req, result.logprob_ids[row][position], result.logprobs[row][position],
                                  result.ranks[row][position])

    def _check_stop(self, req: Request, token: int) -> None:
        params = req.sampling_params
        ends_on_eos = token in req.eos_token_ids and not params.ignore_eos
        # As vLLM: the token that ends the output (an EOS, a stop id) is not part of its text unless
        # include_stop_str_in_output asks for it (even when special tokens are kept).
        decoded = not (ends_on_eos or token in params.stop_token_ids) or params.include_stop_str_in_output
        stop_str = req.detokenizer.append(token) if req.detokenizer is not None and decoded else None
        grammar = req.grammar
        if grammar is not None and not grammar.accept_token(token):
            # Masks make this impossible unless the request's own restrictions masked every token the
            # constraint allows (the sampler then picks among none); either way the output is over.
            restricting = [name for name, value in (("allowed_token_ids", params.allowed_token_ids),
                                                    ("bad_words", params.bad_words)) if value]
            if restricting:
                req.error = (f"no token satisfies both the output constraint and {' and '.join(restricting)} at "
                             f"output position {len(req.output_token_ids) - 1}: they leave no token to sample; "
                             "loosen one of them")
                req.error_kind = FailureKind.INVALID_REQUEST  # the request contradicts itself
            else:
                req.error = f"sampled token {token} is not allowed by the output constraint"
            self.finish(req, RequestStatus.FINISHED_ERROR, None)
        elif grammar is not None and grammar.is_terminated():
            self.finish(req, RequestStatus.FINISHED_STOPPED, stop_str if stop_str is not None else
                        self._stop_token_reason(token, ends_on_eos) if ends_on_eos or token in params.stop_token_ids
                        else None)
        elif stop_str is not None:
            self.finish(req, RequestStatus.FINISHED_STOPPED, stop_str)
        elif ends_on_eos or token in params.stop_token_ids:
            self.finish(req, RequestStatus.FINISHED_STOPPED, self._stop_token_reason(token, ends_on_eos))
        elif len(req.output_token_ids) >= req.max_tokens or len(req.all_token_ids) >= self.engine.max_model_len:
            self.finish(req, RequestStatus.FINISHED_LENGTH, None)

    def _stop_token_reason(self, token: int, ends_on_eos: bool) -> Optional[int]:
        """vLLM's stop_reason for a stop token: None for the tokenizer's own EOS (checked first, so also when
        stop_token_ids lists it), the id for the generation config's other EOS ids and for stop_token_ids."""
        return None if ends_on_eos and token == self.tokenizer_eos_id else token

    def _position(self, token: int, logprob: float, rank: int, top_ids: Sequence[float], top_lps: Sequence[float],
                  decoded: Optional[dict[int, str]]) -> PositionLogprobs:
        """One position's logprobs: the token's, then the top ones after it (ranks from 1), each with its
        text (`decoded`: texts already decoded, shared by the positions of one call; None: no texts, for
        detokenize=False). The top ids may come as floats, from the packed float rows prompt logprobs are
        read back in."""
        position = {token: Logprob(logprob, rank)}
        for r, (tid, lp) in enumerate(zip(top_ids, top_lps), start=1):
            position.setdefault(int(tid), Logprob(lp, r))
        tokenizer = self.engine.tokenizer
        if tokenizer is not None and decoded is not None:
            for tid, entry in position.items():
                if tid not in decoded:
                    decoded[tid] = tokenizer.decode([tid])
                entry.decoded_token = decoded[tid]
        return position

    def _record_logprobs(self, req: Request, ids: list[int], lps: list[float], rank: int) -> None:
        assert req.logprobs is not None
        n = req.sampling_params.logprobs or 0
        decoded: Optional[dict[int, str]] = {} if req.sampling_params.detokenize else None
        req.logprobs.append(self._position(ids[0], lps[0], rank, ids[1:1 + n], lps[1:1 + n], decoded))
        req.cumulative_logprob += lps[0]

    def _record_prompt_logprobs(self, scores: PromptScores) -> None:
        """Appends the prompt tokens a step scored to their requests' prompt_logprobs, in prompt order."""
        rows = scores.rows()
        plan = scores.plan
        w = plan.num_top
        decoded: dict[int, str] = {}
        lo = 0
        for req, first, count in zip(plan.requests, plan.first_token, plan.counts):
            entries, n = req.prompt_logprobs, req.sampling_params.prompt_logprobs or 0
            for k in range(count):
                if entries is None or first + k != len(entries):
                    continue  # finished meanwhile, or already recorded
                row = rows[lo + k]
                entries.append(self._position(req.prompt_token_ids[first + k], row[0], int(row[1]), row[2:2 + n],
                                              row[2 + w:2 + w + n],
                                              decoded if req.sampling_params.detokenize else None))
            lo += count

    def _fork_siblings(self, leader: Request) -> None:
        """n > 1: the siblings share the leader's prompt pages and recompute only the last prompt
        token (copy-on-write of the shared last page), each sampling on its own."""
        for sib in self.engine.pending_forks.pop(leader.request_id):
            sib.block_table = self.engine.kv.fork_blocks(leader.block_table)
            sib.num_computed_tokens = leader.num_prompt_tokens - 1
            # The shared pages hold the leader's draft KV too (speculative decoding): the sibling's draft
            # starts where the leader's stands, not from the first prompt token.
            sib.num_draft_computed_tokens = min(leader.num_draft_computed_tokens, sib.num_computed_tokens)
            sib.num_cached_tokens = leader.num_cached_tokens
            if sib.status == RequestStatus.WAITING_FOR_GRAMMAR:
                fut = self.engine.grammar_waits.pop(sib.request_id)
                ConstraintManager.attach(sib, fut, self.engine.reasoning)  # the leader's compile succeeded
            self.engine.scheduler.add_front(sib)

    # --- finishing ------------------------------------------------------------------------------------
    def fail_request(self, req: Request, error: str, kind: FailureKind = FailureKind.INTERNAL) -> None:
        """Finishes one sequence with its own error; the batch goes on. The error goes out with the
        request's next output (this step's)."""
        if req.is_finished:
            return
        req.error = error
        req.error_kind = kind
        self.finish(req, RequestStatus.FINISHED_ERROR, None)
        self.failed.add(req.parent_id)

    def finish(self, req: Request, status: RequestStatus, stop_reason: Optional[Union[str, int]]) -> None:
        engine = self.engine
        req.status = status
        req.stop_reason = stop_reason
        req.timing.finished = time.monotonic()
        req.num_output_placeholders = 0
        req.clear_proposal()
        if req.num_computed_tokens >= req.num_tokens:
            # Async scheduling already launched a step over the last token, or a speculative row
            # ran past a token that finished the request (their outputs are dropped): as on the
            # synchronous path, the last token's KV does not count, and retained pages end at the
            # last computed token.
            req.num_computed_tokens = req.num_tokens - 1
        keep = engine.kv.blocks_needed(req.num_computed_tokens)
        if req.retain_blocks and len(req.block_table) > keep:
            # Pages past the computed tokens (the last token's, speculative lookahead) hold nothing
            # the session keeps.
            engine.pool.free(req.block_table[keep:])
            del req.block_table[keep:]
        engine.scheduler.remove(req, free_blocks=not req.retain_blocks)
        self.engine.pending_forks.pop(req.request_id, None)
        if req.error and req.error_kind is FailureKind.INVALID_REQUEST and req.timing.first_token is None:
            return  # refused before it ran (a 400: vLLM refuses it before its engine): not a served request
        engine.metrics.requests_finished_total += 1
        hooks = engine.metrics.finish_hooks
        if not hooks:
            return
        group = engine.groups.get(req.parent_id) or [req]
        # The group's largest output once its last sequence is done (vLLM's max_num_generation_tokens).
        group_max = max(c.num_output_tokens for c in group) if all(c.is_finished for c in group) else None
        for hook in hooks:
            try:
                hook(req, group_max)
            except Exception:  # noqa: BLE001 - an exporter must never fail a step
                logger.exception("finish hook failed")

    # --- outputs ----------------------------------------------------------------------------------------
    @staticmethod
    def _completion(req: Request) -> CompletionOutput:
        finished = req.is_finished
        text = req.detokenizer.output_text if req.detokenizer else ""
        delta_text = req.detokenizer.take_new_text(finished) if req.detokenizer else ""
        delta_ids, req.pending_token_ids = req.pending_token_ids, []
        return CompletionOutput(
            index=req.index, text=text, token_ids=list(req.output_token_ids),
            cumulative_logprob=req.cumulative_logprob if req.logprobs is not None else None,
            logprobs=req.logprobs, finish_reason=req.status.finish_reason if finished else None,
            stop_reason=req.stop_reason, delta_text=delta_text, delta_token_ids=delta_ids)

    def collect_outputs(self, touched: set[str]) -> list[RequestOutput]:
        engine = self.engine
        outputs = []
        for parent_id in touched:
            children = engine.groups.get(parent_id)
            if children is None:
                continue
            finished = all(c.is_finished for c in children)
            if not finished and not engine.emit_unfinished:
                continue
            leader = children[0]
            out = RequestOutput(
                request_id=parent_id, prompt=engine.prompts.get(parent_id), prompt_token_ids=leader.prompt_token_ids,
                outputs=[self._completion(c) for c in children], finished=finished,
                prompt_logprobs=leader.prompt_logprobs,
                metrics=RequestMetrics(
                    arrival_time=leader.timing.arrival, first_scheduled_time=leader.timing.first_scheduled,
                    first_token_time=leader.timing.first_token, finished_time=leader.timing.finished,
                    num_prompt_tokens=leader.num_prompt_tokens, num_cached_tokens=max(leader.num_cached_tokens, 0),
                    num_prefilled_tokens=leader.num_prefilled_tokens))
            failed = [c for c in children if c.error]
            if failed:
                out.error, out.error_kind = failed[0].error, failed[0].error_kind
            if finished:
                self._release_group(parent_id, children, out)
            outputs.append(out)
        return outputs

    def _release_group(self, parent_id: str, children: list[Request], out: RequestOutput) -> None:
        engine = self.engine
        leader = children[0]
        if leader.retain_blocks:
            out.retained_block_table = leader.block_table
            out.retained_num_computed_tokens = leader.num_computed_tokens
            out.retained_num_draft_computed_tokens = min(leader.num_draft_computed_tokens, leader.num_computed_tokens)
            leader.block_table = []
            if engine.on_retained is not None:
                engine.on_retained(out)
        for c in children:
            engine.requests.pop(c.request_id, None)
        del engine.groups[parent_id]
        engine.prompts.pop(parent_id, None)
