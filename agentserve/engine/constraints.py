"""Engine-side glue for grammar-constrained requests: compile off the step loop, attach a matcher
per sequence when the compile is done, build the batch bitmask, advance and finish.

Built lazily on the first constrained request, so unconstrained serving pays nothing."""

from __future__ import annotations

import concurrent.futures
from typing import Any, Optional

import torch

from agentserve.engine.failures import request_failure_message
from agentserve.errors import FailureKind
from agentserve.grammar.interface import CompiledGrammar, GrammarError, GrammarMatcher, allocate_token_bitmask
from agentserve.grammar.registry import get_backend
from agentserve.grammar.spec import ConstraintSpec
from agentserve.grammar.tokenizer_info import TokenizerInfo
from agentserve.grammar.tool_formats import detect_tool_format
from agentserve.grammar.compiler import GrammarCompiler
from agentserve.grammar.reasoning import ReasoningMarkers, wrap_for_reasoning
from agentserve.grammar.state import GrammarBitmask, GrammarState
from agentserve.grammar.thinking_budget import budget_matcher
from agentserve.request import Request, RequestStatus
from agentserve.sampling_params import SamplingParams

COMPILE_TIMEOUT_S = 30.0


class PreparedGrammar:
    """A compiled grammar and one matcher already built for the request that asked for it.

    Building a matcher can take a millisecond (llguidance builds each one fresh: see
    llguidance_backend.MATCHER_MODE); it is done on a worker thread when the compile finishes, not
    on the engine thread at admission. The sequences of an n > 1 request share the future: the
    first takes the prepared matcher, the others build theirs."""

    def __init__(self, compiled: CompiledGrammar, matcher: GrammarMatcher) -> None:
        self.compiled = compiled
        self._matcher: Optional[GrammarMatcher] = matcher

    def take_state(self) -> GrammarState:
        matcher, self._matcher = self._matcher, None
        if matcher is None:
            return GrammarState.from_compiled(self.compiled)
        return GrammarState(matcher, self.compiled)


class ConstraintManager:
    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: frozenset[int], backend: str,
                 max_batch: int) -> None:
        if tokenizer is None:
            raise GrammarError("constrained outputs need the model's tokenizer")
        self.tokenizer = tokenizer
        self.info = TokenizerInfo.from_hf(tokenizer, vocab_size=vocab_size, eos_token_ids=sorted(eos_token_ids))
        grammar_backend = get_backend(backend)
        self.compiler = GrammarCompiler(grammar_backend, self.info, max_workers=2, timeout_s=COMPILE_TIMEOUT_S,
                                        cache_size=grammar_backend.cache_entries)
        self.bitmask = GrammarBitmask(vocab_size, max_batch)
        # Two builders: one slow build (a large schema) does not hold up the requests behind it.
        self._matcher_builder = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="agentserve-matcher")
        self._tool_format: Optional[str] = None
        self._mask_failures: list[tuple[Request, str, FailureKind]] = []
        # A request's prepared-grammar future -> the compile it waits for, until that compile ends.
        self._compile_of: dict[concurrent.futures.Future, concurrent.futures.Future] = {}

    def close(self) -> None:
        """Stops the compile workers: queued compiles fail, running ones finish on their own."""
        self.compiler.shutdown()
        self._matcher_builder.shutdown(wait=False, cancel_futures=True)

    @property
    def tool_format(self) -> str:
        if self._tool_format is None:
            self._tool_format = detect_tool_format(self.tokenizer.chat_template if self.tokenizer is not None else None)
        return self._tool_format

    def submit(self, params: SamplingParams) -> "concurrent.futures.Future":
        """Starts (or finds cached) the compile of the request's constraint. Raises GrammarError for
        constraints that are malformed before any compile (bad JSON, unsupported tool schema)."""
        spec = self._spec(params)
        prepared: concurrent.futures.Future = concurrent.futures.Future()

        def build(compiled: CompiledGrammar) -> None:
            try:
                prepared.set_result(PreparedGrammar(compiled, compiled.new_matcher()))
            except Exception as e:  # noqa: BLE001 - reaches the request through attach
                prepared.set_exception(e)

        def on_compiled(done: "concurrent.futures.Future") -> None:
            if done.cancelled():  # exception() would raise: the request must still hear of it
                prepared.set_exception(GrammarError("the compile was cancelled (the grammar service stopped)"))
                return
            error = done.exception()
            if error is not None:
                prepared.set_exception(error)
                return
            try:
                self._matcher_builder.submit(build, done.result())
            except RuntimeError as e:  # the manager was closed meanwhile
                prepared.set_exception(GrammarError(f"the grammar service stopped: {e}"))

        compile_future = self.compiler.submit(spec)
        if not compile_future.done():
            self._compile_of[prepared] = compile_future
            compile_future.add_done_callback(lambda _f: self._compile_of.pop(prepared, None))
        compile_future.add_done_callback(on_compiled)
        return prepared

    def check_compiles(self, params: SamplingParams) -> None:
        """Waits for the compile of the request's constraint (cached for the request that follows) and raises
        GrammarError when it fails: the offline API refuses such a request before queueing it, as vLLM's does."""
        self.compiler.submit(self._spec(params)).result()

    def _spec(self, params: SamplingParams) -> ConstraintSpec:
        """The request's constraint as the compiler keys it (tool calls in the chat template's format)."""
        spec = ConstraintSpec.from_sampling_params(params, tool_format=self.tool_format if params.tools else None)
        assert spec is not None
        return spec

    def budget_state(self, request: Request, reasoning: ReasoningMarkers) -> Optional[GrammarState]:
        """The grammar state of an unconstrained request with a thinking_token_budget (None when its prompt
        closed the reasoning): its rows then take part in the batch's masks like a constrained one's."""
        budget = request.sampling_params.thinking_token_budget
        assert budget is not None, "only requests with a thinking_token_budget get a budget state"
        matcher = budget_matcher(self.info, reasoning, request.prompt_token_ids, budget)
        return None if matcher is None else GrammarState(matcher)

    def withdraw(self, prepared: "concurrent.futures.Future") -> None:
        """The request that `submit` returned `prepared` to was aborted before its grammar was ready:
        its compile is dropped unless it already runs or another request waits for it too."""
        compile_future = self._compile_of.pop(prepared, None)
        if compile_future is not None:
            self.compiler.withdraw(compile_future)

    @staticmethod
    def attach(request: Request, future: "concurrent.futures.Future",
               reasoning: Optional[ReasoningMarkers] = None) -> Optional[str]:
        """Gives a waiting request its matcher once the compile is done (behind its reasoning block when
        a reasoning parser is configured: grammar/reasoning.py); returns an error message when the
        compile failed."""
        try:
            prepared: PreparedGrammar = future.result(timeout=0)
        except GrammarError as e:
            return f"the output constraint could not be compiled: {e}"
        except Exception as e:  # noqa: BLE001 - a backend crash fails this request only
            # ... as the request's fault too: its constraint is what the backend cannot take, and sending it
            # again would fail the same way.
            return f"the output constraint could not be compiled: {type(e).__name__}: {e}"
        state = prepared.take_state()
        matcher = wrap_for_reasoning(state.matcher, reasoning, request.prompt_token_ids,
                                     request.sampling_params.thinking_token_budget)
        request.grammar = GrammarState(matcher, state.grammar)
        request.status = RequestStatus.WAITING
        return None

    def fill_bitmask(self, requests: list[Request], draft_token_ids: Optional[list[list[int]]] = None
                     ) -> Optional[torch.Tensor]:
        """Bitmask rows for the sampling requests of a step (None when none is constrained). With
        `draft_token_ids` (a speculative verification step), request i has len(drafts[i]) + 1 rows, the
        mask at each of its scored positions (its matcher after the drafts before that position). A
        matcher that fails to fill its row fails its request alone (take_mask_failures): the row is
        left unconstrained and the token sampled there is dropped when the engine finishes it."""
        if draft_token_ids is not None:
            return self._fill_with_drafts(requests, draft_token_ids)
        # A request finished by the step before (processed while this one launched) samples in vain:
        # its matcher may have terminated, so its row stays unconstrained.
        rows = [(i, r.grammar) for i, r in enumerate(requests) if r.grammar is not None and not r.is_finished]
        if not rows:
            return None
        try:
            return self.bitmask.fill(rows, batch_size=len(requests))
        except Exception:  # noqa: BLE001 - find the rows at fault, one at a time, below
            pass
        good = []
        scratch = allocate_token_bitmask(1, self.bitmask.vocab_size)
        for i, state in rows:
            try:
                state.fill(scratch, 0)
                good.append((i, state))
            except Exception as e:  # noqa: BLE001 - this request's matcher: its failure alone
                self._fail_mask(requests[i], e)
        if not good:
            self.bitmask.fill([], batch_size=len(requests))
            return None
        return self.bitmask.fill(good, batch_size=len(requests))

    def _fill_with_drafts(self, requests: list[Request], drafts: list[list[int]]) -> Optional[torch.Tensor]:
        if all(r.grammar is None or r.is_finished for r in requests):
            return None
        bitmask = allocate_token_bitmask(sum(len(d) + 1 for d in drafts), self.bitmask.vocab_size)
        first = 0
        for request, draft in zip(requests, drafts):
            if request.grammar is not None and not request.is_finished:
                try:
                    request.grammar.fill_with_draft(bitmask, first, draft)
                except Exception as e:  # noqa: BLE001 - this request's matcher: its failure alone
                    bitmask[first:first + len(draft) + 1].fill_(-1)
                    self._fail_mask(request, e)
            first += len(draft) + 1
        return bitmask

    def _fail_mask(self, request: Request, error: Exception) -> None:
        if isinstance(error, GrammarError):  # the constraint met a limit of the backend's: the request's own
            self._mask_failures.append((request, request_failure_message("in its output constraint", request, error),
                                        FailureKind.INVALID_REQUEST))
        else:
            self._mask_failures.append((request, request_failure_message(
                "while filling its output constraint's mask", request, error), FailureKind.INTERNAL))

    def take_mask_failures(self) -> list[tuple[Request, str, FailureKind]]:
        """The requests whose mask could not be filled since the last call, with their errors and whose
        fault each is."""
        failures, self._mask_failures = self._mask_failures, []
        return failures
