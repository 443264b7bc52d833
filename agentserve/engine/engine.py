"""The engine: add requests, run steps, emit outputs. Everything runs on the caller's thread;
AsyncEngine (async_engine.py) drives it from a background thread for the servers.

Async scheduling (vLLM V1's name; SchedulerConfig.async_scheduling, on by default on CUDA): a step
call schedules and launches step N+1 before it reads step N's sampled ids, so the host's work
(scheduling, input preparation, appending tokens, stop checks, outputs) overlaps the device's. Each
request whose token is still in flight carries a placeholder: the scheduler counts it, and step
N+1 gathers that token from step N's sampled-id tensor on the device. A request that finishes at
step N has computed one token in vain at N+1; it is dropped when N+1 is processed. Steps whose
next step needs the tokens on the host (penalties, n > 1 forks, speculation) are processed before
scheduling, as on the synchronous path. Grammar masks need them only for N+1's sampling: step N is
processed inside N+1's launch, after N+1's forward is queued (launch.py).
"""

from __future__ import annotations

import concurrent.futures
import logging
from typing import Any, Callable, Optional, Sequence, Union

import torch

from agentserve.cache.block_pool import BlockPool
from agentserve.cache.kv_cache_manager import KVCacheManager
from agentserve.config import EngineConfig
from agentserve.engine.batch_defaults import with_device_batch_defaults
from agentserve.engine.constraints import ConstraintManager
from agentserve.engine.detokenizer import IncrementalDetokenizer
from agentserve.engine.failures import log_step_failure
from agentserve.engine.launch import launch_step
from agentserve.engine.generation_defaults import read_generation_defaults
from agentserve.engine.loading import (apply_chat_template_override, decide_max_model_len, generation_eos, load_model_tokenizer,
                                       resolve_async_scheduling, resolve_draft_model, resolve_model)
from agentserve.engine.metrics import EngineMetrics
from agentserve.engine.output import InflightStep, OutputProcessor
from agentserve.engine.scheduler import AdmitHook, Scheduler
from agentserve.engine.speculation import SpecProposer, Speculation
from agentserve.engine.validation import (check_priority, check_requested_backend, truncate_prompt, validate_logprobs,
                                         validate_vocab_params)
from agentserve.sampling.bad_words import bad_words_token_ids
from agentserve.errors import ContextLengthError, FailureKind, InvalidRequestError
from agentserve.grammar.interface import GrammarError
from agentserve.grammar.reasoning import ReasoningMarkers
from agentserve.engine.lora_control import LoRAControl
from agentserve.lora.key import LoRAKey
from agentserve.model.gguf import shared_gguf_readers
from agentserve.model.loader import resolve_dtype
from agentserve.outputs import RequestOutput
from agentserve.parallel.runner import start_model_runner
from agentserve.request import Request, RequestStatus
from agentserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

Prompt = Union[str, Sequence[int]]


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        self.device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # max_num_seqs / max_num_batched_tokens left unset follow the device (engine/batch_defaults.py).
        config = with_device_batch_defaults(config, self.device)
        self.config = config
        # A GGUF file is parsed once for its shape, its tokenizer and its weights (model/gguf.py).
        with shared_gguf_readers():
            self.arch, self.model_path = resolve_model(config)
            # Checked before the tokenizer loads (a GGUF file's takes seconds): a wrong flag fails at once.
            self.max_model_len = decide_max_model_len(config, self.arch)
            self.tokenizer = load_model_tokenizer(config, self.model_path)
            apply_chat_template_override(self.tokenizer, config.model.chat_template)
            self.eos_token_ids = generation_eos(self.model_path, self.arch, self.tokenizer,
                                                config.model.generation_config)
            # The model's sampling defaults for fields a request leaves unset (engine/generation_defaults.py).
            self.generation_defaults = read_generation_defaults(config.model.generation_config, self.model_path)
            # Thinking models' markers (grammar/reasoning.py): checked before the model loads, so a wrong parser
            # fails at once.
            self.reasoning: Optional[ReasoningMarkers] = (
                ReasoningMarkers.for_tokenizer(config.reasoning_parser, self.tokenizer, frozenset(self.eos_token_ids))
                if config.reasoning_parser else None)
            self.dtype = resolve_dtype(config.model.dtype, self.arch, self.device)
            if config.attention_backend != "auto":
                from agentserve.kernels import set_backend

                set_backend(config.attention_backend)  # process-wide: the kernels dispatch on it
            self.model_name = config.model.served_model_names()[0]
            # With tensor_parallel_size > 1 this starts the other ranks too (parallel/runner.py).
            self.runner = start_model_runner(config, self.arch, self.device, self.dtype, self.model_path,
                                             self.max_model_len, resolve_draft_model(config, self.arch, self.tokenizer))
        self.lora_manager = self.runner.lora_manager  # None without enable_lora (lora/interface.py)
        self.pool = BlockPool(self.runner.num_blocks, config.cache.block_size, config.cache.enable_prefix_caching)
        self.kv = KVCacheManager(self.pool)
        self.scheduler = Scheduler(config.scheduler, self.kv)
        self.metrics = EngineMetrics(kv_blocks_total=self.pool.num_blocks)
        self.requests: dict[str, Request] = {}         # internal id -> sequence
        self.groups: dict[str, list[Request]] = {}     # caller's id -> its n sequences
        self.prompts: dict[str, Optional[str]] = {}
        self.pending_forks: dict[str, list[Request]] = {}  # leader id -> siblings waiting for its prompt
        # Called on the step thread with each finished output that carries retained pages (sessions adopt
        # them there, so no consumer race can lose them); it sets out.retained_block_table = None once adopted.
        self.on_retained: Optional[Callable[[RequestOutput], None]] = None
        self.session_store: Optional[object] = None  # the attached SessionStore (sessions/store.py; tests read it)
        self.constraints: Optional["ConstraintManager"] = None  # built on the first constrained request
        self.grammar_waits: dict[str, "concurrent.futures.Future"] = {}  # request id -> its compile
        self.output = OutputProcessor(self)
        self.lora = LoRAControl(self)  # adapter names -> keys (id + load generation), load / unload by name
        self.emit_unfinished = True  # streaming callers want an output per step; offline, only finished ones
        self.async_scheduling = resolve_async_scheduling(config, self.device)
        self._inflight: Optional[InflightStep] = None  # async scheduling: launched, not yet processed
        # Whether the last step launched, processed and ran nothing (see step): the step loop naps after one.
        self.last_step_idle = False
        self.closed = False
        # Speculative decoding (engine/speculation.py): proposes drafts for the requests due for a decode.
        self.spec_proposer: Optional[SpecProposer] = Speculation(self, config.spec) if config.spec.method else None

    @classmethod
    def from_kwargs(cls, model: str, **kwargs: Any) -> "Engine":
        return cls(EngineConfig.from_kwargs(model, **kwargs))

    # --- requests -----------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self.tokenizer is None:
            raise InvalidRequestError("this model has no tokenizer: pass prompts as token id lists")
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def default_max_tokens(self, num_prompt_tokens: int) -> int:
        """max_tokens of a request that sets none (offline, HTTP and session turns alike): the room left in the
        context or in what the KV cache holds for one sequence, whichever is smaller, capped by the model's
        generation_config max_new_tokens as in vLLM. At least 1: a prompt that leaves no room fails
        validation with its own message."""
        return max(1, self.generation_defaults.output_cap(self.output_room(num_prompt_tokens)))

    def output_room(self, num_prompt_tokens: int) -> int:
        """The most output tokens a prompt of this length leaves room for: the context's and what the KV cache
        holds for one sequence, whichever is smaller (may be <= 0)."""
        return min(self.max_model_len, self.pool.num_blocks * self.pool.block_size) - num_prompt_tokens

    def validate(self, prompt_token_ids: Sequence[int], params: SamplingParams) -> SamplingParams:
        """Raises InvalidRequestError naming the problem; returns params with max_tokens resolved."""
        n = len(prompt_token_ids)
        if n == 0:
            raise InvalidRequestError("the prompt is empty")
        vocab = self.arch.vocab_size
        bad = [t for t in prompt_token_ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab}); got {bad[:5]}")
        validate_vocab_params(params, vocab)
        whole = {k: vocab for k in ("logprobs", "prompt_logprobs") if getattr(params, k) == -1}
        if whole:  # vLLM's -1: every token's
            params = params.clone(**whole)
        validate_logprobs(params, self.config.model.max_logprobs, vocab)
        check_requested_backend(params.structured_outputs_backend, self.config.grammar_backend,
                                "structured_outputs.backend")
        if params.thinking_token_budget is not None and self.reasoning is None:
            raise InvalidRequestError("thinking_token_budget needs the server's --reasoning-parser, which names the "
                                      "model's reasoning markers; this server runs without one")
        if n >= self.max_model_len:
            raise ContextLengthError(f"the prompt has {n} tokens; max_model_len is {self.max_model_len} "
                                     "(prompt plus output must fit)", "prompt", n, self.max_model_len)
        if params.max_tokens is None:
            params = params.clone(max_tokens=self.default_max_tokens(n))
        assert params.max_tokens is not None  # set above when the request left it out
        if n + params.max_tokens > self.max_model_len:
            raise ContextLengthError(
                f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) = {n + params.max_tokens} exceeds "
                f"max_model_len ({self.max_model_len}); lower max_tokens or shorten the prompt", "max_tokens", n,
                self.max_model_len, params.max_tokens)
        pages = self.kv.blocks_needed(n + params.max_tokens)
        if pages > self.pool.num_blocks:
            held = self.pool.num_blocks * self.kv.block_size  # the most one sequence can have: the limit here
            raise ContextLengthError(
                f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) needs up to {pages} KV pages of "
                f"{self.kv.block_size} tokens; the KV cache has only {self.pool.num_blocks} ({held} tokens); lower "
                "max_tokens or shorten the prompt", "max_tokens", n, held, params.max_tokens)
        return params

    def reset_prefix_cache(self) -> bool:
        """Forgets every cached page's hash (vLLM's reset_prefix_cache: a benchmark's cold start, or after a
        change the cache cannot see); later prompts compute their prefixes again. False, changing nothing,
        while pages are held (requests running, sessions open)."""
        return self.pool.reset_prefix_cache()

    def add_request(self, request_id: str, prompt: Prompt, params: Optional[SamplingParams] = None, *,
                    priority: int = 0, cache_salt: Optional[str] = None, lora_name: Optional[str] = None,
                    lora_key: Optional[LoRAKey] = None,
                    prefix_block_table: Optional[list[int]] = None, num_prefix_computed: int = 0,
                    retain_blocks: bool = False, share_prefix: bool = False,
                    admit_hook: Optional[AdmitHook] = None, arrival_time: Optional[float] = None) -> None:
        """Queues a request; `arrival_time` (time.monotonic(), as vLLM's) is when a frontend received it.
        `prefix_block_table` hands in pages (a session's) already holding the KV of the first
        `num_prefix_computed` tokens; the engine takes over those references (with share_prefix it takes
        its own, copy-on-write, and the caller keeps its references). `admit_hook` hands them in later,
        when the scheduler admits the request (sessions: a queued turn holds no pages of its own, and
        its session may be swapped out until then)."""
        if self.closed:
            raise RuntimeError("the engine is closed")
        check_priority(priority, self.config.scheduler.policy)
        params = params or SamplingParams()
        if lora_key is None:  # a name not loaded fails here, never later inside a step
            lora_key = self.lora.resolve(lora_name)
        if request_id in self.groups:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        prompt_text = prompt if isinstance(prompt, str) else None
        token_ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if prefix_block_table is None and admit_hook is None:  # sessions keep their history whole
            token_ids = truncate_prompt(token_ids, params, self.max_model_len)
        params = self.validate(token_ids, params)
        if params.n > 1 and (retain_blocks or prefix_block_table or admit_hook is not None):
            raise InvalidRequestError("n > 1 is not supported for session turns; fork the session instead")
        bad_words = bad_words_token_ids(self.tokenizer, params.bad_words, self.arch.vocab_size) if params.bad_words else []
        grammar_future = self._submit_constraint(params) if params.has_constraint else None
        budgeted = params.thinking_token_budget is not None and grammar_future is None
        children = []
        for i in range(params.n):
            rid = request_id if params.n == 1 else f"{request_id}#{i}"
            req = Request(rid, token_ids, params, eos_token_ids=self.eos_token_ids, priority=priority,
                          cache_salt=cache_salt, lora_name=lora_name, lora_key=lora_key, index=i,
                          parent_id=request_id)
            if arrival_time is not None:  # the latency histograms count the wait for the step thread too
                req.timing.arrival = arrival_time
            if self.tokenizer is not None and params.detokenize:
                req.detokenizer = IncrementalDetokenizer(self.tokenizer, token_ids, params.skip_special_tokens,
                                                         list(params.stop or []), params.include_stop_str_in_output,
                                                         params.min_tokens, params.spaces_between_special_tokens)
            req.retain_blocks = retain_blocks
            req.bad_words_token_ids = bad_words
            if budgeted:  # a constrained request gets its budget with its matcher (ConstraintManager.attach)
                assert self.reasoning is not None  # validate() refused the budget without a parser
                req.grammar = self._constraint_manager().budget_state(req, self.reasoning)
            children.append(req)
            self.requests[rid] = req
        leader = children[0]
        if prefix_block_table:
            leader.block_table = self.kv.fork_blocks(prefix_block_table) if share_prefix else list(prefix_block_table)
            leader.num_computed_tokens = num_prefix_computed
            leader.num_cached_tokens = num_prefix_computed
        leader.admit_hook = admit_hook
        self.groups[request_id] = children
        self.prompts[request_id] = prompt_text
        if grammar_future is not None:
            for req in children:  # each sequence gets its own matcher when the compile is done
                req.status = RequestStatus.WAITING_FOR_GRAMMAR
                self.grammar_waits[req.request_id] = grammar_future
        self.scheduler.add(leader)
        if len(children) > 1:
            self.pending_forks[leader.request_id] = children[1:]

    def _constraint_manager(self) -> ConstraintManager:
        try:
            if self.constraints is None:
                self.constraints = ConstraintManager(self.tokenizer, self.arch.vocab_size, self.eos_token_ids,
                                                      self.config.grammar_backend, self.config.scheduler.max_num_seqs)
            return self.constraints
        except GrammarError as e:
            raise InvalidRequestError(str(e)) from None

    def _submit_constraint(self, params: SamplingParams) -> "concurrent.futures.Future":
        manager = self._constraint_manager()
        try:
            return manager.submit(params)
        except GrammarError as e:
            raise InvalidRequestError(str(e)) from None

    def check_constraint(self, params: SamplingParams) -> None:
        """Raises InvalidRequestError when the request's output constraint does not compile (waiting for it)."""
        try:
            self._constraint_manager().check_compiles(params)
        except GrammarError as e:
            raise InvalidRequestError(f"the output constraint could not be compiled: {e}") from None
        except Exception as e:  # noqa: BLE001 - a backend crash on this constraint: the request's, as attach reads it
            raise InvalidRequestError(f"the output constraint could not be compiled: {type(e).__name__}: {e}") from None

    def _poll_grammars(self) -> None:
        """Requests whose compile finished start waiting for a slot; failed compiles fail alone."""
        if not self.grammar_waits:
            return
        for rid, fut in list(self.grammar_waits.items()):
            if not fut.done():
                continue
            del self.grammar_waits[rid]
            req = self.requests.get(rid)
            if req is None or req.is_finished:
                continue
            error = ConstraintManager.attach(req, fut, self.reasoning)
            if error is not None:
                self.output.fail_request(req, error, FailureKind.INVALID_REQUEST)

    def _wait_for_grammars(self) -> None:
        # Nothing else to run: block briefly on the compiles instead of spinning.
        concurrent.futures.wait(list(self.grammar_waits.values()), timeout=0.005,
                                return_when=concurrent.futures.FIRST_COMPLETED)

    def abort(self, request_id: str) -> bool:
        """Stops a request (the caller's id) wherever it is and frees its pages."""
        children = self.groups.pop(request_id, None)
        if children is None:
            return False
        waits = {self.grammar_waits[r.request_id] for r in children if r.request_id in self.grammar_waits}
        for req in children:
            if not req.is_finished:
                self.scheduler.remove(req, free_blocks=True)
                req.status = RequestStatus.FINISHED_ABORTED
            elif req.retain_blocks and req.block_table:
                # Finished (failed outside a step) but not yet handed to its caller: nobody else frees these.
                self.kv.free(req)
            self.requests.pop(req.request_id, None)
            self.grammar_waits.pop(req.request_id, None)
        self.pending_forks.pop(children[0].request_id, None)
        self.prompts.pop(request_id, None)
        self._release_idle_speculation()
        if self.constraints is not None:
            for fut in waits:  # one per request (its n sequences share it): a queued compile it alone needs is dropped
                self.constraints.withdraw(fut)
        return True

    def has_unfinished(self) -> bool:
        return bool(self.groups)

    def close(self) -> None:
        """Releases the device memory (KV pages, CUDA graphs, weights), the pinned swap space and the
        grammar compile workers, so that another engine fits in this process. Idempotent. The host
        bookkeeping (queues, page pool counters, metrics) stays readable; no request can be added."""
        if self.closed:
            return
        self.closed = True
        inflight, self._inflight = self._inflight, None
        if inflight is not None:
            try:
                inflight.handle.result()  # the device finishes the step before its memory goes
            except Exception as e:  # noqa: BLE001 - its requests are beyond help; the release goes on
                log_step_failure("step result at close", e, [c.request.request_id for c in inflight.chunks])
        if self.constraints is not None:
            self.constraints.close()
        if self.spec_proposer is not None:
            self.spec_proposer.release()
        self.runner.close()

    # --- the step -----------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedules and launches one step and processes the results of one (the same step, or with
        async scheduling the previous one: step N's sampled ids are read only after step N+1 has been
        launched, so the host's work on them overlaps the device's work on N+1)."""
        self._poll_grammars()
        touched: set[str] = set(self.output.failed)
        self.output.failed.clear()
        prev, self._inflight = self._inflight, None
        num_sampled = 0
        spec_k = self.spec_proposer.num_tokens_for_step(self.scheduler.num_rows_ahead) if self.spec_proposer else 0
        if prev is not None and (not prev.overlappable or spec_k):
            # The next step needs prev's tokens on the host (penalties, forks, and proposals, which
            # continue the known tokens: speculation runs in the synchronous order).
            touched |= self.output.update_from_output(prev)
            num_sampled += prev.num_appended
            prev = None
        if spec_k and self.spec_proposer is not None:
            self.spec_proposer([r for r in self.scheduler.running if r.num_computed_tokens == r.num_tokens - 1], spec_k)
        sched = self.scheduler.schedule()
        if sched.is_empty:  # no forward, but page copies / swaps queued meanwhile (sessions) still run
            self.runner.execute_idle_device_ops(sched.device_ops)
        launched = launch_step(self, sched, prev) if not sched.is_empty else None
        if launched is not None and self.spec_proposer is not None:
            self.spec_proposer.after_launch(launched)
        if prev is not None:
            touched |= self.output.update_from_output(prev)
            num_sampled += prev.num_appended
        if launched is not None:
            if self.async_scheduling:
                self._inflight = launched
            else:
                touched |= self.output.update_from_output(launched)
                num_sampled += launched.num_appended
        elif prev is None and self.grammar_waits and not touched:
            self._wait_for_grammars()
        # Nothing ran and nothing came out: the queue waits on something outside the step (a swap in's copy in
        # flight, a page-starved head). The step thread naps on this instead of calling step() in a tight loop.
        self.last_step_idle = (launched is None and prev is None and not touched and not sched.device_ops
                               and not self.grammar_waits)
        counted = sched.total_num_scheduled_tokens if self.metrics.iteration_tokens is not None else 0
        self.metrics.update_after_step(self.scheduler.running, self.scheduler.num_waiting, self.pool,
                                       len(sched.preempted), num_sampled, counted)
        touched |= self.output.failed  # requests failed alone during this step report it now
        self.output.failed.clear()
        outputs = self.output.collect_outputs(touched)
        self._release_idle_speculation()
        return outputs

    def _release_idle_speculation(self) -> None:
        """Once no request is left, drops a draft continuation queued for the last ones (its drafts and
        q on the device, and the finished requests it names: an idle engine holds neither)."""
        if not self.groups and self.spec_proposer is not None:
            self.spec_proposer.release()

    def needs_host_tokens(self, req: Request) -> bool:
        """Whether scheduling the step after one that samples `req` needs the sampled token on the
        host: penalties count output tokens on the host, bad words match them there, and an n > 1 leader
        forks its siblings once its first token is in. (Grammar masks need it too, but only for the next step's sampling,
        which is queued after its forward: launch.py processes the step there.)"""
        return (req.uses_penalties or bool(req.bad_words_token_ids)
                or (bool(self.pending_forks) and req.request_id in self.pending_forks))

