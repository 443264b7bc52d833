"""The engine: add requests, run steps, emit outputs. Everything runs on the caller's thread;
AsyncEngine (async_engine.py) drives it from a background thread for the servers.

Async scheduling (vLLM V1's name; SchedulerConfig.async_scheduling, on by default on CUDA): a step
call schedules and launches step N+1 before it reads step N's sampled ids, so the host's work
(scheduling, input preparation, appending tokens, stop checks, outputs) overlaps the device's. Each
request whose token is still in flight carries a placeholder: the scheduler counts it, and step
N+1 gathers that token from step N's sampled-id tensor on the device. A request that finishes at
step N has computed one token in vain at N+1; it is dropped when N+1 is processed. Steps whose
next step needs the tokens on the host (grammar masks, penalties, n > 1 forks) are processed
before scheduling, as on the synchronous path.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import operator
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch

from agentserve.cache.block_pool import BlockPool
from agentserve.cache.kv_cache_manager import KVCacheManager
from agentserve.config import EngineConfig
from agentserve.engine.constraints import ConstraintManager
from agentserve.engine.detokenizer import IncrementalDetokenizer
from agentserve.engine.failures import (STEP_FAILED, STEP_FAILED_FOR_NEW_REQUEST, log_step_failure,
                                        request_failure_message)
from agentserve.engine.metrics import EngineMetrics
from agentserve.engine.request import (CompletionOutput, Logprob, Request, RequestMetrics, RequestOutput,
                                       RequestStatus)
from agentserve.engine.scheduler import AdmitHook, Scheduler, SchedulerOutput
from agentserve.errors import InvalidRequestError
from agentserve.grammar.backend import GrammarError
from agentserve.lora.interface import LoRAManager
from agentserve.model.arch_config import ArchConfig, ModelLoadError
from agentserve.model.loader import resolve_dtype
from agentserve.sampling_params import SamplingParams
from agentserve.worker.launched_step import LaunchedStep, StepResult
from agentserve.worker.model_runner import ModelRunner, ScheduledChunk

logger = logging.getLogger(__name__)

Prompt = Union[str, Sequence[int]]
_computed_of = operator.attrgetter("num_computed_tokens")
_table_of = operator.attrgetter("block_table")


class _InflightStep:
    """A launched step: what was scheduled, and the handle its sampled ids come back through."""

    def __init__(self, chunks: list[ScheduledChunk], handle: LaunchedStep, overlappable: bool) -> None:
        self.chunks = chunks
        self.handle = handle
        # False when the step after this one must not be scheduled before this one is processed.
        self.overlappable = overlappable
        self.num_appended = 0


def resolve_model(config: EngineConfig) -> tuple[ArchConfig, Optional[Path]]:
    """The model's shape and directory; with load_format=dummy the model may be a named shape."""
    path = Path(config.model.model).expanduser()
    if path.is_dir():
        return ArchConfig.from_dir(path), path
    if config.model.load_format == "dummy":
        from agentserve.testing.tiny import NAMED_SHAPES

        if config.model.model in NAMED_SHAPES:
            return ArchConfig.from_dict(NAMED_SHAPES[config.model.model]), None
        raise ModelLoadError(f"unknown model shape {config.model.model!r}; named shapes: {', '.join(NAMED_SHAPES)}")
    raise ModelLoadError(f"model path {config.model.model!r} does not exist or is not a directory "
                         "(agentserve loads local Hugging Face model directories; there is no hub download)")


def resolve_async_scheduling(config: EngineConfig, device: torch.device) -> bool:
    """On by default where it pays (CUDA: the host prepares step N+1 while the device runs N). The
    environment variable AGENTSERVE_ASYNC_SCHEDULING=0/1 overrides the default (tests use it to run
    the CPU suite both ways); an explicit config value wins over both."""
    if config.scheduler.async_scheduling is not None:
        return config.scheduler.async_scheduling
    env = os.environ.get("AGENTSERVE_ASYNC_SCHEDULING")
    if env is not None and env != "":
        return env not in ("0", "false", "False")
    return device.type == "cuda"


def _load_tokenizer(path: Optional[Path]) -> Any:
    if path is None:
        return None
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        logger.warning("%s has no tokenizer: prompts must be token ids and outputs carry no text", path)
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 - any tokenizer problem is a load error for the user
        raise ModelLoadError(f"cannot load the tokenizer from {path}: {e}") from None


def _generation_eos(path: Optional[Path], arch: ArchConfig, tokenizer: Any) -> frozenset[int]:
    eos: list[int] = []
    gen_cfg = path / "generation_config.json" if path else None
    if gen_cfg is not None and gen_cfg.is_file():
        value = json.loads(gen_cfg.read_text()).get("eos_token_id")
        eos = [value] if isinstance(value, int) else list(value or [])
    if not eos:
        eos = list(arch.eos_token_ids)
    if not eos and tokenizer is not None and tokenizer.eos_token_id is not None:
        eos = [tokenizer.eos_token_id]
    return frozenset(eos)


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.arch, self.model_path = resolve_model(config)
        tok_path = Path(config.model.tokenizer) if config.model.tokenizer else self.model_path
        self.tokenizer = _load_tokenizer(tok_path)
        self.lora_manager: Optional[LoRAManager] = None  # multi-LoRA serving lands with lora/manager.py
        self.eos_token_ids = _generation_eos(self.model_path, self.arch, self.tokenizer)
        self.max_model_len = self._decide_max_model_len()
        self.dtype = resolve_dtype(config.model.dtype, self.arch, self.device)
        if config.attention_backend != "auto":
            from agentserve.kernels import set_backend

            set_backend(config.attention_backend)  # process-wide: the kernels dispatch on it
        self.model_name = config.model.served_model_names()[0]
        self.runner = ModelRunner(config, self.arch, self.device, self.dtype, self.model_path, self.max_model_len)
        self.pool = BlockPool(self.runner.num_blocks, config.cache.block_size, config.cache.enable_prefix_caching)
        self.kv = KVCacheManager(self.pool)
        self.scheduler = Scheduler(config.scheduler, self.kv)
        self.metrics = EngineMetrics(kv_blocks_total=self.pool.num_blocks)
        self.requests: dict[str, Request] = {}         # internal id -> sequence
        self.groups: dict[str, list[Request]] = {}     # caller's id -> its n sequences
        self._prompts: dict[str, Optional[str]] = {}
        self._pending_forks: dict[str, list[Request]] = {}  # leader id -> siblings waiting for its prompt
        # Called on the step thread with each finished output that carries retained pages (sessions adopt
        # them there, so no consumer race can lose them); it sets out.retained_block_table = None once adopted.
        self.on_retained: Optional[Callable[[RequestOutput], None]] = None
        self._constraints: Optional["ConstraintManager"] = None  # built on the first constrained request
        self._grammar_waits: dict[str, "concurrent.futures.Future"] = {}  # request id -> its compile
        self._failed: set[str] = set()  # caller ids failed inside the engine, to report at the next step
        # Streaming callers want an output per step; the offline API only needs finished ones.
        self.emit_unfinished = True
        self.async_scheduling = resolve_async_scheduling(config, self.device)
        self._inflight: Optional[_InflightStep] = None  # async scheduling: launched, not yet processed

    @classmethod
    def from_kwargs(cls, model: str, **kwargs: Any) -> "Engine":
        return cls(EngineConfig.from_kwargs(model, **kwargs))

    def _decide_max_model_len(self) -> int:
        limit = self.arch.max_position_embeddings
        if self.arch.sliding_window:
            # Attention here is full; past the window it would differ from the model's training.
            limit = min(limit, self.arch.sliding_window)
        wanted = self.config.model.max_model_len
        if wanted is None:
            return limit
        if wanted > limit:
            raise ModelLoadError(f"max_model_len={wanted} exceeds the model's limit of {limit} positions")
        return wanted

    # --- requests -----------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self.tokenizer is None:
            raise InvalidRequestError("this model has no tokenizer: pass prompts as token id lists")
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def validate(self, prompt_token_ids: Sequence[int], params: SamplingParams) -> SamplingParams:
        """Raises InvalidRequestError naming the problem; returns params with max_tokens resolved."""
        n = len(prompt_token_ids)
        if n == 0:
            raise InvalidRequestError("the prompt is empty")
        vocab = self.arch.vocab_size
        bad = [t for t in prompt_token_ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab}); got {bad[:5]}")
        self._validate_vocab_params(params, vocab)
        if n >= self.max_model_len:
            raise InvalidRequestError(f"the prompt has {n} tokens; max_model_len is {self.max_model_len} "
                                      "(prompt plus output must fit)")
        if params.max_tokens is None:
            params = params.clone(max_tokens=self.max_model_len - n)
        elif n + params.max_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) = {n + params.max_tokens} exceeds "
                f"max_model_len ({self.max_model_len}); lower max_tokens or shorten the prompt")
        pages = self.kv.blocks_needed(n + params.max_tokens)
        if pages > self.pool.num_blocks:
            raise InvalidRequestError(f"the request needs up to {pages} KV pages; the cache has only "
                                      f"{self.pool.num_blocks}")
        return params

    @staticmethod
    def _validate_vocab_params(params: SamplingParams, vocab: int) -> None:
        """The parts of SamplingParams only checkable against the model's vocabulary: out of it they
        would index past the logits inside a step (where the failure would hit the whole batch)."""
        if params.top_k > vocab:
            raise InvalidRequestError(f"top_k must be at most the vocabulary size ({vocab}), or 0 / -1 to "
                                      f"disable it; got {params.top_k}")
        bad = [t for t in params.stop_token_ids if t >= vocab]
        if bad:
            raise InvalidRequestError(f"stop_token_ids must be token ids in [0, {vocab}); got {bad[:5]}")

    def add_request(self, request_id: str, prompt: Prompt, params: Optional[SamplingParams] = None, *,
                    priority: int = 0, cache_salt: Optional[str] = None, lora_name: Optional[str] = None,
                    prefix_block_table: Optional[list[int]] = None, num_prefix_computed: int = 0,
                    retain_blocks: bool = False, share_prefix: bool = False,
                    admit_hook: Optional[AdmitHook] = None) -> None:
        """Queues a request. `prefix_block_table` hands in pages (a session's) already holding the KV
        of the first `num_prefix_computed` tokens; the engine takes over those references (with
        share_prefix it takes its own, copy-on-write, and the caller keeps its references).
        `admit_hook` hands them in later, when the scheduler admits the request (sessions: a queued
        turn holds no pages of its own, and its session may be swapped out until then)."""
        params = params or SamplingParams()
        if request_id in self.groups:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        prompt_text = prompt if isinstance(prompt, str) else None
        token_ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        params = self.validate(token_ids, params)
        if params.n > 1 and (retain_blocks or prefix_block_table or admit_hook is not None):
            raise InvalidRequestError("n > 1 is not supported for session turns; fork the session instead")
        grammar_future = self._submit_constraint(params) if params.has_constraint else None
        children = []
        for i in range(params.n):
            rid = request_id if params.n == 1 else f"{request_id}#{i}"
            req = Request(rid, token_ids, params, eos_token_ids=self.eos_token_ids, priority=priority,
                          cache_salt=cache_salt, lora_name=lora_name, index=i, parent_id=request_id)
            if self.tokenizer is not None:
                req.detokenizer = IncrementalDetokenizer(self.tokenizer, token_ids, params.skip_special_tokens,
                                                         list(params.stop or []), params.include_stop_str_in_output)
            req.retain_blocks = retain_blocks
            children.append(req)
            self.requests[rid] = req
        leader = children[0]
        if prefix_block_table:
            leader.block_table = self.kv.fork_blocks(prefix_block_table) if share_prefix else list(prefix_block_table)
            leader.num_computed_tokens = num_prefix_computed
            leader.num_cached_tokens = num_prefix_computed
        leader.admit_hook = admit_hook
        self.groups[request_id] = children
        self._prompts[request_id] = prompt_text
        if grammar_future is not None:
            for req in children:  # each sequence gets its own matcher when the compile is done
                req.status = RequestStatus.WAITING_FOR_GRAMMAR
                self._grammar_waits[req.request_id] = grammar_future
        self.scheduler.add(leader)
        if len(children) > 1:
            self._pending_forks[leader.request_id] = children[1:]
        self.metrics.prompt_tokens_total += len(token_ids)

    def _submit_constraint(self, params: SamplingParams) -> "concurrent.futures.Future":
        try:
            if self._constraints is None:
                self._constraints = ConstraintManager(self.tokenizer, self.arch.vocab_size, self.eos_token_ids,
                                                      self.config.grammar_backend, self.config.scheduler.max_num_seqs)
            return self._constraints.submit(params)
        except GrammarError as e:
            raise InvalidRequestError(str(e)) from None

    def _poll_grammars(self) -> None:
        """Requests whose compile finished start waiting for a slot; failed compiles fail alone."""
        if not self._grammar_waits:
            return
        for rid, fut in list(self._grammar_waits.items()):
            if not fut.done():
                continue
            del self._grammar_waits[rid]
            req = self.requests.get(rid)
            if req is None or req.is_finished:
                continue
            error = ConstraintManager.attach(req, fut)
            if error is not None:
                req.error = error
                self._finish(req, RequestStatus.FINISHED_ERROR, None)
                self._failed.add(req.parent_id)

    def _wait_for_grammars(self) -> None:
        # Nothing else to run: block briefly on the compiles instead of spinning.
        concurrent.futures.wait(list(self._grammar_waits.values()), timeout=0.005,
                                return_when=concurrent.futures.FIRST_COMPLETED)

    def abort(self, request_id: str) -> bool:
        """Stops a request (the caller's id) wherever it is and frees its pages."""
        children = self.groups.pop(request_id, None)
        if children is None:
            return False
        for req in children:
            if not req.is_finished:
                self.scheduler.remove(req, free_blocks=True)
                req.status = RequestStatus.FINISHED_ABORTED
            elif req.retain_blocks and req.block_table:
                # Finished (failed outside a step) but not yet handed to its caller: nobody else frees these.
                self.kv.free(req)
            self.requests.pop(req.request_id, None)
            self._grammar_waits.pop(req.request_id, None)
        self._pending_forks.pop(children[0].request_id, None)
        self._prompts.pop(request_id, None)
        return True

    def has_unfinished(self) -> bool:
        return bool(self.groups)

    # --- the step -----------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedules and launches one step and processes the results of one (the same step, or with
        async scheduling the previous one: step N's sampled ids are read only after step N+1 has been
        launched, so the host's work on them overlaps the device's work on N+1)."""
        self._poll_grammars()
        touched: set[str] = set(self._failed)
        self._failed.clear()
        prev, self._inflight = self._inflight, None
        num_sampled = 0
        if prev is not None and not prev.overlappable:
            # The next step needs prev's tokens on the host (grammar masks, penalties, forks).
            touched |= self._process(prev)
            num_sampled += prev.num_appended
            prev = None
        sched = self.scheduler.schedule()
        launched = self._launch(sched, prev) if not sched.is_empty else None
        if prev is not None:
            touched |= self._process(prev)
            num_sampled += prev.num_appended
        if launched is not None:
            if self.async_scheduling:
                self._inflight = launched
            else:
                touched |= self._process(launched)
                num_sampled += launched.num_appended
        elif prev is None and self._grammar_waits and not touched:
            self._wait_for_grammars()
        self._update_metrics(sched, num_sampled)
        touched |= self._failed  # requests failed alone during this step report it now
        self._failed.clear()
        return self._collect_outputs(touched)

    def _needs_host_tokens(self, req: Request) -> bool:
        """Whether scheduling the step after one that samples `req` needs the sampled token on the
        host: grammar masks follow the accepted token, penalties count output tokens on the host,
        and an n > 1 leader forks its siblings once its first token is in."""
        return (req.grammar is not None or req.uses_penalties
                or (bool(self._pending_forks) and req.request_id in self._pending_forks))

    def _launch(self, sched: SchedulerOutput, prev: Optional[_InflightStep]) -> Optional[_InflightStep]:
        now = time.monotonic()
        chunks = []
        newest: list[Request] = []  # admitted for the first time in this step
        num_scheduled = sched.num_scheduled_tokens
        for req in sched.scheduled:
            n = num_scheduled[req.request_id]
            sample = req.num_computed_tokens + n >= len(req.all_token_ids) + req.num_output_placeholders
            chunks.append(ScheduledChunk(req, n, sample))
            if req.timing.first_scheduled is None:
                req.timing.first_scheduled = now
                newest.append(req)
        chunks, handle = self._launch_isolating_failures(chunks, sched.block_copies, prev, newest)
        if handle is None:
            return None
        overlappable = not any(c.sample and self._needs_host_tokens(c.request) for c in chunks)
        block_size = self.kv.block_size
        for chunk in chunks:
            req = chunk.request
            if req.num_computed_tokens < req.num_prompt_tokens:
                # Prefilled = prompt positions actually run through the model (cache misses, recomputes).
                prompt_part = min(chunk.num_tokens, req.num_prompt_tokens - req.num_computed_tokens)
                req.num_prefilled_tokens += prompt_part
                self.metrics.prefilled_tokens_total += prompt_part
            # The KV of these tokens is written by the launched step: later steps (queued behind it on
            # the device) may rely on it, so they count as computed from now on.
            req.num_computed_tokens += chunk.num_tokens
            if req.num_computed_tokens // block_size > req.num_registered_blocks:  # a page may have filled
                self.kv.cache_full_blocks(req)
            if chunk.sample:
                req.num_output_placeholders += 1
        if self._constraints is not None:
            for req, error in self._constraints.take_mask_failures():
                self._fail_request(req, error)
        return _InflightStep(chunks, handle, overlappable)

    def _launch_isolating_failures(self, chunks: list[ScheduledChunk], block_copies: list[tuple[int, int]],
                                   prev: Optional[_InflightStep], newest: list[Request]
                                   ) -> tuple[list[ScheduledChunk], Optional[LaunchedStep]]:
        """Launches the step. A failure that no request can be blamed for is retried once without
        the requests admitted in this step (the likeliest cause: everything else ran before), which
        fail alone; if the retry fails too, the whole batch fails. Returns the chunks launched."""
        mask_fn = self._constraints.fill_bitmask if self._constraints is not None else None
        prev_handle = prev.handle if prev is not None else None
        try:
            return chunks, self.runner.launch(chunks, block_copies, mask_fn, prev_handle)
        except Exception as e:  # noqa: BLE001 - contained below, one request or one batch at a time
            log_step_failure("step launch", e, [c.request.request_id for c in chunks])
        suspects = set(map(id, newest))
        kept = [c for c in chunks if id(c.request) not in suspects]
        for req in newest:
            self._fail_request(req, STEP_FAILED_FOR_NEW_REQUEST)
        if kept and len(kept) < len(chunks):
            try:
                # Copies are idempotent; pages of the failed requests are free and nobody reads them.
                return kept, self.runner.launch(kept, block_copies, mask_fn, prev_handle)
            except Exception as e:  # noqa: BLE001
                log_step_failure("step launch retry", e, [c.request.request_id for c in kept])
        for chunk in kept:
            self._fail_request(chunk.request, STEP_FAILED)
        return [], None

    def _fail_request(self, req: Request, error: str) -> None:
        """Finishes one sequence with its own error; the batch goes on. The error goes out with the
        request's next output (this step's)."""
        if req.is_finished:
            return
        req.error = error
        self._finish(req, RequestStatus.FINISHED_ERROR, None)
        self._failed.add(req.parent_id)

    def _process(self, step: _InflightStep) -> set[str]:
        """Appends a launched step's sampled tokens (waiting for them), checks stops, forks. Returns
        the caller ids that have an output to emit (only finished ones unless emit_unfinished)."""
        try:
            result = step.handle.result()
        except Exception as e:  # noqa: BLE001 - the device failed this step: its requests fail, no others
            log_step_failure("step result", e, [c.request.request_id for c in step.chunks])
            for chunk in step.chunks:
                self._fail_request(chunk.request, STEP_FAILED)
            return set()
        sampled = result.sampled
        touched: set[str] = set()
        emit_all = self.emit_unfinished
        now = time.monotonic()
        row = -1
        appended = 0
        for chunk in step.chunks:
            if not chunk.sample:
                continue
            row += 1
            req = chunk.request
            if req.status >= RequestStatus.FINISHED_STOPPED:
                continue  # aborted, or finished by the step before: this token was computed in vain
            req.num_output_placeholders -= 1
            try:
                self._append_sampled(req, sampled[row], result, row, now)
                if self._pending_forks and req.request_id in self._pending_forks and not req.is_finished:
                    self._fork_siblings(req)
            except Exception as e:  # noqa: BLE001 - detokenizer, matcher, stop checks: this request's own
                where = "in its output constraint" if isinstance(e, GrammarError) else "while processing its output"
                self._fail_request(req, request_failure_message(where, req, e))
            appended += 1
            if emit_all or req.status >= RequestStatus.FINISHED_STOPPED:
                touched.add(req.parent_id)
        step.num_appended += appended
        self.metrics.generation_tokens_total += appended
        return touched

    def _fork_siblings(self, leader: Request) -> None:
        """n > 1: the siblings share the leader's prompt pages and recompute only the last prompt
        token (copy-on-write of the shared last page), each sampling on its own."""
        for sib in self._pending_forks.pop(leader.request_id):
            sib.block_table = self.kv.fork_blocks(leader.block_table)
            sib.num_computed_tokens = leader.num_prompt_tokens - 1
            sib.num_cached_tokens = leader.num_cached_tokens
            if sib.status == RequestStatus.WAITING_FOR_GRAMMAR:
                fut = self._grammar_waits.pop(sib.request_id)
                ConstraintManager.attach(sib, fut)  # the leader's compile is done and succeeded
            self.scheduler.add_front(sib)

    def _append_sampled(self, req: Request, token: int, result: StepResult, row: int, now: float) -> None:
        timing = req.timing
        if timing.first_token is None:
            timing.first_token = now
        timing.last_token = now
        req.output_token_ids.append(token)
        req.all_token_ids.append(token)
        req.pending_token_ids.append(token)
        if req.logprobs is not None and result.logprobs is not None:
            assert result.logprob_ids is not None and result.ranks is not None
            self._record_logprobs(req, result.logprob_ids[row], result.logprobs[row], result.ranks[row])
        params = req.sampling_params
        ends_on_eos = token in req.eos_token_ids and not params.ignore_eos
        # The EOS token ends the text; it is not part of it (even when special tokens are kept).
        stop_str = req.detokenizer.append(token) if req.detokenizer is not None and not ends_on_eos else None
        grammar = req.grammar
        if grammar is not None and not grammar.accept_token(token):
            # Masks make this impossible; if it happens the output can no longer be trusted.
            req.error = f"sampled token {token} is not allowed by the output constraint"
            self._finish(req, RequestStatus.FINISHED_ERROR, None)
        elif grammar is not None and grammar.is_terminated():
            self._finish(req, RequestStatus.FINISHED_STOPPED, stop_str if stop_str is not None else
                         (token if token in params.stop_token_ids else None))
        elif stop_str is not None:
            self._finish(req, RequestStatus.FINISHED_STOPPED, stop_str)
        elif token in params.stop_token_ids:
            self._finish(req, RequestStatus.FINISHED_STOPPED, token)
        elif ends_on_eos:
            self._finish(req, RequestStatus.FINISHED_STOPPED, None)
        elif len(req.output_token_ids) >= req.max_tokens or len(req.all_token_ids) >= self.max_model_len:
            self._finish(req, RequestStatus.FINISHED_LENGTH, None)

    def _record_logprobs(self, req: Request, ids: list[int], lps: list[float], rank: int) -> None:
        assert req.logprobs is not None
        n = req.sampling_params.logprobs or 0
        position = {ids[0]: Logprob(lps[0], rank)}
        for r, (tid, lp) in enumerate(zip(ids[1:1 + n], lps[1:1 + n]), start=1):
            position.setdefault(tid, Logprob(lp, r))
        if self.tokenizer is not None:
            for tid, lp in position.items():
                lp.decoded_token = self.tokenizer.decode([tid])
        req.logprobs.append(position)
        req.cumulative_logprob += lps[0]

    def _finish(self, req: Request, status: RequestStatus, stop_reason: Optional[Union[str, int]]) -> None:
        req.status = status
        req.stop_reason = stop_reason
        req.timing.finished = time.monotonic()
        req.num_output_placeholders = 0
        if req.num_computed_tokens >= req.num_tokens:
            # Async scheduling already launched a step over the last token (its output is dropped):
            # as on the synchronous path, the last token's KV does not count, and retained pages
            # end at the last computed token.
            req.num_computed_tokens = req.num_tokens - 1
            keep = self.kv.blocks_needed(req.num_computed_tokens)
            if req.retain_blocks and len(req.block_table) > keep:
                self.pool.free(req.block_table[keep:])
                del req.block_table[keep:]
        self.scheduler.remove(req, free_blocks=not req.retain_blocks)
        self._pending_forks.pop(req.request_id, None)
        self.metrics.requests_finished_total += 1
        for hook in self.metrics.finish_hooks:
            try:
                hook(req)
            except Exception:  # noqa: BLE001 - an exporter must never fail a step
                logger.exception("finish hook failed")

    # --- outputs ---------------------------------------------------------------------------------
    def _completion(self, req: Request) -> CompletionOutput:
        finished = req.is_finished
        text = req.detokenizer.output_text if req.detokenizer else ""
        delta_text = req.detokenizer.take_new_text(finished) if req.detokenizer else ""
        delta_ids, req.pending_token_ids = req.pending_token_ids, []
        return CompletionOutput(
            index=req.index, text=text, token_ids=list(req.output_token_ids),
            cumulative_logprob=req.cumulative_logprob if req.logprobs is not None else None,
            logprobs=req.logprobs, finish_reason=req.status.finish_reason if finished else None,
            stop_reason=req.stop_reason, delta_text=delta_text, delta_token_ids=delta_ids)

    def _collect_outputs(self, touched: set[str]) -> list[RequestOutput]:
        outputs = []
        for parent_id in touched:
            children = self.groups.get(parent_id)
            if children is None:
                continue
            finished = all(c.is_finished for c in children)
            if not finished and not self.emit_unfinished:
                continue
            leader = children[0]
            out = RequestOutput(
                request_id=parent_id, prompt=self._prompts.get(parent_id), prompt_token_ids=leader.prompt_token_ids,
                outputs=[self._completion(c) for c in children], finished=finished,
                metrics=RequestMetrics(
                    arrival_time=leader.timing.arrival, first_scheduled_time=leader.timing.first_scheduled,
                    first_token_time=leader.timing.first_token, finished_time=leader.timing.finished,
                    num_prompt_tokens=leader.num_prompt_tokens, num_cached_tokens=max(leader.num_cached_tokens, 0),
                    num_prefilled_tokens=leader.num_prefilled_tokens))
            errors = [c.error for c in children if c.error]
            if errors:
                out.error = errors[0]
            if finished:
                if leader.retain_blocks:
                    out.retained_block_table = leader.block_table
                    out.retained_num_computed_tokens = leader.num_computed_tokens
                    leader.block_table = []
                    if self.on_retained is not None:
                        self.on_retained(out)
                for c in children:
                    self.requests.pop(c.request_id, None)
                del self.groups[parent_id]
                self._prompts.pop(parent_id, None)
            outputs.append(out)
        return outputs

    def _update_metrics(self, sched: SchedulerOutput, num_sampled: int) -> None:
        m = self.metrics
        m.num_running = self.scheduler.num_running
        m.num_waiting = self.scheduler.num_waiting
        m.kv_blocks_used = self.pool.num_used_blocks
        m.prefix_cache_queries = self.pool.query_tokens
        m.prefix_cache_hits = self.pool.hit_tokens
        m.num_preemptions_total += len(sched.preempted)
        m.record_step(num_sampled)
        # KV memory efficiency: tokens held in pages over the slots of the pages they own.
        running = self.scheduler.running
        held = sum(map(_computed_of, running))
        allocated = sum(map(len, map(_table_of, running))) * self.pool.block_size
        m.kv_slots_held += held
        m.kv_slots_allocated += allocated
