"""Grammar compilation off the step loop: a small thread pool, a time limit, and a cache.

    compiler = GrammarCompiler(get_backend("auto"), tokenizer_info, max_workers=2, timeout_s=30)
    fut = compiler.submit(spec)        # concurrent.futures.Future[CompiledGrammar], never blocks
    ...                                # each step: if fut.done(): fut.result() or fut.exception()

A compile that raises, or runs past `timeout_s`, resolves its future with a `GrammarError` naming
the cause; only the requests waiting on it fail. The backends release the GIL while compiling,
so a slow compile does not stall the step loop. A compile that timed out cannot be killed (it is
native code in a thread): its slot is given back at the deadline so later compiles are not
blocked, and if it finishes later its result still fills the cache.

A compile is only done once its grammar has been *used*: the worker builds a matcher, fills its
first bitmask, accepts one allowed token and fills the next (`probe_compiled`). Backends build
parts of a grammar lazily, so a regex `a{1000000}` or a schema whose `pattern` is that large
compiles fine and then fails at the first token, and a schema that only refers to itself compiles
to a grammar that allows no token at all. Probing here makes those the request's compile error,
before it is admitted, instead of a failure inside the engine's step.

The cache is keyed by (spec, tokenizer identity, backend); hits (and known failures) return an
already-done future. Failures are cached too (a bad schema fails fast the next time), except
time-outs, which are retried on the next submit unless the late compile has finished by then.
"""

from __future__ import annotations

import collections
import json
import threading
import time
from concurrent.futures import Future
from typing import Any, Optional

from agentserve.grammar import structure
from agentserve.grammar.interface import (
    CompiledGrammar,
    GrammarBackend,
    GrammarError,
    allocate_token_bitmask,
    bitmask_to_ids,
)
from agentserve.grammar.spec import ConstraintSpec
from agentserve.grammar.tokenizer_info import TokenizerInfo
from agentserve.grammar.tool_constraint import call_schemas_of
from agentserve.grammar.unenforced_keywords import refuse_unenforced

_MAX_ERROR_CHARS = 500


def _short(error: BaseException) -> str:
    # Backends append their internal state dump after "<state>": not useful to a client.
    text = str(error).split("<state>")[0].strip()
    return text if len(text) <= _MAX_ERROR_CHARS else text[:_MAX_ERROR_CHARS] + "..."


def _string_patterns(node: Any) -> list[str]:
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "pattern" and isinstance(value, str) and value:
                found.append(value)
            else:
                found.extend(_string_patterns(value))
    elif isinstance(node, list):
        for item in node:
            found.extend(_string_patterns(item))
    return found


def _unanchored(pattern: str) -> str:
    # Regex constraints match the whole output: JSON-schema anchors are implied there.
    if pattern.startswith("^"):
        pattern = pattern[1:]
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        pattern = pattern[:-1]
    return pattern or ".*"


def probe_compiled(compiled: CompiledGrammar) -> None:
    """Uses a fresh matcher of `compiled` the way the first steps of a request will: fill the first
    bitmask, accept the lowest allowed non-EOS token, fill the next. Raises GrammarError when that
    fails or when the first mask allows nothing (not even EOS): no output could ever satisfy the
    constraint. Two steps catch what backends defer to the first use (lazy lexers, lazy rules);
    a grammar that fails only deeper in its output still fails inside the step, for its request
    alone."""
    spec, info = compiled.spec, compiled.tokenizer_info
    try:
        matcher = compiled.new_matcher()
        bitmask = allocate_token_bitmask(1, info.vocab_size, pin_memory=False)
        matcher.fill_bitmask(bitmask, 0)
        allowed = bitmask_to_ids(bitmask[0], info.vocab_size)
        if not allowed:
            raise GrammarError(f"the {spec.kind} allows no output at all (for example a schema that only "
                               "refers to itself, or one no value satisfies)")
        first = next((t for t in allowed if t not in info.eos_token_ids), None)
        if first is not None and matcher.accept_token(first):
            matcher.fill_bitmask(bitmask, 0)
    except GrammarError as e:
        raise GrammarError(f"{compiled.backend_name} cannot use this {spec.kind}: {_short(e)}") from None
    except Exception as e:  # a backend's own exception types: still this constraint's error
        raise GrammarError(f"{compiled.backend_name} cannot use this {spec.kind}: {type(e).__name__}: "
                           f"{_short(e)}") from None


class _Job:
    __slots__ = ("key", "spec", "future", "waiters", "started", "finished", "timed_out", "timer")

    def __init__(self, key: Any, spec: ConstraintSpec) -> None:
        self.key = key
        self.spec = spec
        self.future: Future = Future()
        self.waiters = 1  # submits that got this job's future and have not withdrawn
        self.started = 0.0
        self.finished = False
        self.timed_out = False
        self.timer: Optional[threading.Timer] = None  # the timeout watch, cancelled when the job ends


def _failed(error: GrammarError) -> "Future[CompiledGrammar]":
    """A future already failed with `error` (a submit answered without a compile)."""
    failed: Future = Future()
    failed.set_exception(error)
    return failed


class GrammarCompiler:
    def __init__(self, backend: GrammarBackend, tokenizer_info: TokenizerInfo, *, max_workers: int = 2,
                 timeout_s: Optional[float] = 30.0, cache_size: int = 1024, max_stuck: int = 8) -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be >= 1")
        self.backend = backend
        self.tokenizer_info = tokenizer_info
        self.max_workers = max_workers
        self.timeout_s = timeout_s
        self.cache_size = cache_size
        self.max_stuck = max_stuck
        self._lock = threading.Lock()
        self._cache: "collections.OrderedDict[Any, Future]" = collections.OrderedDict()
        self._inflight: dict[Any, _Job] = {}
        # Keys whose compile timed out and still runs: a resubmit fails at once rather than start another
        # thread on it (one slow schema sent max_stuck times stopped every compile until they ended).
        self._stuck_keys: set[Any] = set()
        self._queue: "collections.deque[_Job]" = collections.deque()
        self._active = 0   # compiles holding a worker slot
        self._stuck = 0    # timed-out compiles still running
        self._closed = False
        self.stats = {"hits": 0, "misses": 0, "compiled": 0, "failed": 0, "timeouts": 0}

    # -- public ---------------------------------------------------------------------------------
    def key(self, spec: ConstraintSpec) -> Any:
        return (spec, self.tokenizer_info.identity, self.backend.name)

    def submit(self, spec: ConstraintSpec) -> "Future[CompiledGrammar]":
        """A future for the compiled grammar; done at once on a cache hit."""
        key = self.key(spec)
        with self._lock:
            if self._closed:
                raise RuntimeError("GrammarCompiler is shut down")
            fut = self._cache.get(key)
            if fut is not None:
                self._cache.move_to_end(key)
                self.stats["hits"] += 1
                error = fut.exception()  # a cached future is done
                # A fresh exception per caller: raising one cached instance again and again grows its
                # traceback with every raise.
                return _failed(GrammarError(str(error))) if error is not None else fut
            job = self._inflight.get(key)
            if job is not None:
                self.stats["hits"] += 1
                job.waiters += 1
                return job.future
            if key in self._stuck_keys:
                return _failed(self._timeout_error(spec))
            self.stats["misses"] += 1
            job = _Job(key, spec)
            self._inflight[key] = job
            self._queue.append(job)
            self._dispatch_locked()
            return job.future

    def withdraw(self, future: "Future[CompiledGrammar]") -> None:
        """One caller of `submit` that got `future` no longer needs it (its request was aborted). A
        compile still queued that no caller needs any more is dropped, so requests that are gone do
        not hold the workers that others' compiles wait for; a running one finishes (native code
        cannot be stopped) and fills the cache. The future is cancelled only when nobody waits on it."""
        with self._lock:
            job = next((j for j in self._queue if j.future is future), None)
            if job is None:  # a cache hit, or running or done by now
                return
            job.waiters -= 1
            if job.waiters > 0:
                return
            self._queue.remove(job)
            self._inflight.pop(job.key, None)
        job.future.cancel()

    def compile(self, spec: ConstraintSpec) -> CompiledGrammar:
        """Blocking convenience: submit and wait (raises GrammarError)."""
        return self.submit(spec).result()

    def shutdown(self) -> None:
        with self._lock:
            self._closed = True
            pending = list(self._queue)
            self._queue.clear()
        for job in pending:
            self._resolve_error(job, GrammarError("grammar compiler shut down"))

    def __len__(self) -> int:
        return len(self._cache)

    # -- internals ------------------------------------------------------------------------------
    def _dispatch_locked(self) -> None:
        while self._queue and self._active < self.max_workers and self._stuck < self.max_stuck:
            job = self._queue.popleft()
            if not job.future.set_running_or_notify_cancel():  # cancelled while queued
                self._inflight.pop(job.key, None)
                continue
            self._active += 1
            job.started = time.monotonic()
            threading.Thread(target=self._run, args=(job,), name="grammar-compile", daemon=True).start()
            if self.timeout_s is not None:
                job.timer = threading.Timer(self.timeout_s, self._on_timeout, args=(job,))
                job.timer.daemon = True
                job.timer.start()

    def _run(self, job: _Job) -> None:
        try:
            compiled = self._compile_and_probe(job.spec)
            if job.spec.kind == "tool_calls":
                self._probe_each_tool(job.spec)
            error: Optional[BaseException] = None
        except GrammarError as e:
            compiled, error = None, e
            if job.spec.kind == "tool_calls":
                error = self._name_failing_tool(job.spec) or e
        except Exception as e:  # a library crash fails this request only
            compiled, error = None, GrammarError(f"{self.backend.name} failed to compile {job.spec.kind}: "
                                                 f"{type(e).__name__}: {e}")
        with self._lock:
            job.finished = True
            if job.timer is not None:
                job.timer.cancel()  # a finished job's watch thread need not outlive it
            late = job.timed_out
            if late:
                self._stuck -= 1
                self._stuck_keys.discard(job.key)
            else:
                self._active -= 1
                self._inflight.pop(job.key, None)
            done: Future = Future()
            if error is None:
                done.set_result(compiled)
                self.stats["compiled"] += 1
            else:
                # Cached as its message alone: the caught exception's traceback holds the compile's frames.
                done.set_exception(GrammarError(str(error)))
                self.stats["failed"] += 1
            if not late or error is None:
                self._put_locked(job.key, done)
            self._dispatch_locked()
        if not late:
            if error is None:
                self._resolve(job, compiled)
            else:
                self._resolve_error(job, error)

    def _compile_and_probe(self, spec: ConstraintSpec) -> CompiledGrammar:
        if spec.kind == "json_schema":  # every backend refuses these: named here, before any backend's message
            refuse_unenforced(json.loads(str(spec.payload)), "json_schema")
        compiled = self.backend.compile(spec, self.tokenizer_info)
        probe_compiled(compiled)
        if spec.kind == "json_schema":
            self._probe_patterns(json.loads(str(spec.payload)))
        elif spec.kind == "structural_tag":
            for schema in structure.walk_json(json.loads(str(spec.payload))["grammar"]):
                self._probe_patterns(schema)
        return compiled

    def _probe_patterns(self, schema: Any) -> None:
        """Each string `pattern` of the schema, compiled alone as a regex and probed: the probe of
        the whole schema only reaches the strings on its first path, and a pattern's lexer is built
        when the output reaches that string (`"pattern": "^d{1000000}$"` compiles, then fails
        there). A pattern whose standalone regex does not compile is left to the schema's compile,
        which accepted it in its own dialect."""
        for pattern in _string_patterns(schema):
            try:
                compiled = self.backend.compile(ConstraintSpec.regex(_unanchored(pattern)), self.tokenizer_info)
            except Exception:  # noqa: BLE001 - see the docstring
                continue
            try:
                probe_compiled(compiled)
            except GrammarError as e:
                raise GrammarError(f"the pattern {pattern[:80]!r}{'...' if len(pattern) > 80 else ''} "
                                   f"cannot be used: {e}") from None

    def _name_failing_tool(self, spec: ConstraintSpec) -> Optional[GrammarError]:
        """Compiles and probes each tool's call schema alone; the first that fails, named (a client
        needs to know which tool to fix), or None when each works alone."""
        for name, schema in call_schemas_of(spec):
            try:
                self._compile_and_probe(ConstraintSpec.json_schema(schema))
            except Exception as e:  # noqa: BLE001 - any failure names this tool
                return GrammarError(f"the parameters of tool {json.dumps(name)} cannot be used: {_short(e)}")
        return None

    def _probe_each_tool(self, spec: ConstraintSpec) -> None:
        # The probe of the whole tool-call grammar walks one path (the lowest allowed token), through
        # one tool at most; a tool whose parameters fail on first use would fail only when the model
        # calls it, inside the step. Each tool alone is probed too (once per tool set: cached).
        error = self._name_failing_tool(spec)
        if error is not None:
            raise error

    def _on_timeout(self, job: _Job) -> None:
        with self._lock:
            if job.finished:
                return
            job.timed_out = True
            self._active -= 1
            self._stuck += 1
            self._stuck_keys.add(job.key)
            self._inflight.pop(job.key, None)
            self.stats["timeouts"] += 1
            self._dispatch_locked()
        self._resolve_error(job, self._timeout_error(job.spec))

    def _timeout_error(self, spec: ConstraintSpec) -> GrammarError:
        return GrammarError(f"grammar compile timed out after {self.timeout_s:g} s ({self.backend.name}, {spec.kind}); "
                            "the constraint is too complex for this backend")

    def _put_locked(self, key: Any, fut: Future) -> None:
        self._cache[key] = fut
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    @staticmethod
    def _resolve(job: _Job, compiled: Any) -> None:
        try:
            job.future.set_result(compiled)
        except Exception:  # already resolved
            pass

    @staticmethod
    def _resolve_error(job: _Job, error: BaseException) -> None:
        try:
            if not job.future.running() and not job.future.set_running_or_notify_cancel():
                return  # cancelled
            job.future.set_exception(error)
        except Exception:  # already resolved
            pass
