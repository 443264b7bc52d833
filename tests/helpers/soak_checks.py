"""The invariants a live server must meet once a load has stopped and every session is closed
(tests/test_soak.py). Each check returns what it found wrong (an empty list: nothing), so that one
run reports every violation at once."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import os
import re
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import httpx

from agentserve.adapters.client import AgentClient
from agentserve.adapters.openai.metrics import parse_metrics
from agentserve.adapters.openai.responses import ResponsesEndpoint
from agentserve.engine.async_engine import _Stream
from agentserve.request import Request
from agentserve.service.serve import ServerHandle
from agentserve.sessions.types import PendingTurn, Session

# Threads one server may own: the step thread, the gRPC poller, and the bounded executor pools (render:
# tokenizer_workers, default 4; matcher: 2; the event loop's default executor: min(32, cpus + 4)).
MAX_SERVER_THREADS = 2 + 4 + 2 + min(32, (os.cpu_count() or 1) + 4)
# Objects that belong to one request or session: none may outlive them.
PER_REQUEST_TYPES: tuple[type, ...] = (Request, _Stream, Session, PendingTurn)


def rss_bytes() -> int:
    """Resident memory after glibc hands its free heap pages back: without the trim, memory freed
    by many threads' arenas stays resident by chance (one full-suite run read +85 MiB between two
    identical rounds, against a 48 MiB bound the soak meets on its own), which is allocator state,
    not a leak; a leak stays resident after the trim."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: measure as is
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def count_objects(types: tuple[type, ...] = PER_REQUEST_TYPES) -> dict[str, int]:
    gc.collect()
    counts = {t.__name__: 0 for t in types}
    for obj in gc.get_objects():
        for t in types:
            if type(obj) is t:
                counts[t.__name__] += 1
    return counts


def task_names() -> list[str]:
    """The running loop's tasks other than the caller's, by their coroutine's qualified name."""
    me = asyncio.current_task()
    return sorted(t.get_coro().__qualname__ for t in asyncio.all_tasks() if t is not me and not t.done())


@dataclass(frozen=True)
class Snapshot:
    tasks: list[str]
    threads: list[str]
    objects: dict[str, int]
    rss: int
    adapters: list[str]


def snapshot(handle: ServerHandle) -> Snapshot:
    manager = handle.engine.lora_manager
    return Snapshot(tasks=task_names(), threads=live_thread_names(), objects=count_objects(), rss=rss_bytes(),
                    adapters=sorted(manager.names()) if manager is not None else [])


async def close_all_sessions(agent: AgentClient) -> int:
    """Closes every open session through the API (ListSessions, CloseSession); returns how many."""
    ids = [s.session_id async for s in agent.iter_sessions()]
    for sid in ids:
        await agent.session(sid).close()
    return len(ids)


async def wait_idle(handle: ServerHandle, timeout: float = 30.0) -> list[str]:
    engine = handle.engine
    deadline = time.monotonic() + timeout
    while engine.has_unfinished() or handle.async_engine.num_pending or len(handle.store):
        if time.monotonic() > deadline:
            return [f"not idle after {timeout:.0f} s: {len(engine.groups)} request groups, "
                    f"{handle.async_engine.num_pending} streams, {len(handle.store)} sessions"]
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)  # aborts and stream cleanups land on the next command drain
    return []


def _engine_state(handle: ServerHandle) -> list[str]:
    """Step-thread state (run through AsyncEngine.run, between steps)."""
    e, bad = handle.engine, []
    sched = e.scheduler
    if sched.waiting or sched.running or sched.has_device_ops():
        bad.append(f"scheduler: {len(sched.waiting)} waiting, {len(sched.running)} running, "
                   f"device ops {sched.has_device_ops()}")
    for name in ("requests", "groups", "prompts", "pending_forks", "grammar_waits"):
        left = getattr(e, name)
        if left:
            bad.append(f"engine.{name} holds {list(left)[:5]}")
    busy = e.pool.referenced_blocks()
    if busy or e.pool.num_free_blocks != e.pool.num_blocks:
        bad.append(f"pages: {e.pool.num_free_blocks}/{e.pool.num_blocks} free, referenced {busy[:10]}")
    stale = [(h, b) for h, b in e.pool._cached.items() if e.pool.block_hash(b) != h]
    if stale:
        bad.append(f"prefix cache maps {len(stale)} hashes to pages that hold other hashes")
    store = handle.store
    if store.num_free_swap_slots != store.num_swap_slots:
        bad.append(f"swap slots: {store.num_free_swap_slots}/{store.num_swap_slots} free")
    if store._pending or store.residency._restoring or any(store._sessions_of.values()):
        bad.append(f"session store: pending {list(store._pending)}, restoring {len(store.residency._restoring)}, "
                   f"per-tenant counts {dict(store._sessions_of)}")
    if e.lora_manager is not None:
        in_use = e.lora.adapters_in_use()
        if in_use != ([], []) or e.lora_manager._step_slots:
            bad.append(f"LoRA: in use {in_use}, step slots {e.lora_manager._step_slots}")
    if e.constraints is not None:
        c = e.constraints.compiler
        if c._queue or c._inflight or c._active or e.constraints._compile_of:
            bad.append(f"grammar: {len(c._queue)} queued, {len(c._inflight)} in flight, {c._active} active, "
                       f"{len(e.constraints._compile_of)} withdrawable")
    if e.spec_proposer is not None and e.spec_proposer._reserved_for_continuation:
        bad.append(f"speculation reserves pages for {e.spec_proposer._reserved_for_continuation}")
    return bad


async def check_idle(handle: ServerHandle, http_url: str) -> list[str]:
    """Every invariant of an idle server with no session open."""
    bad = await handle.async_engine.run(lambda: _engine_state(handle))
    if handle.async_engine._streams:
        bad.append(f"async engine streams left: {list(handle.async_engine._streams)[:5]}")
    pool = handle.store.render_pool
    if pool._tokenizers.qsize() != pool.limits.tokenizer_workers or pool._executor._work_queue.qsize():
        bad.append(f"render pool: {pool._tokenizers.qsize()}/{pool.limits.tokenizer_workers} tokenizers back, "
                   f"{pool._executor._work_queue.qsize()} jobs queued")
    closing = [len(r.closing) for r in gc.get_objects() if type(r) is ResponsesEndpoint]
    if any(closing):
        bad.append(f"Responses endpoint still closing sessions: {closing}")
    if any(handle.tenants._in_flight.values()):
        bad.append(f"tenant request slots held: {handle.tenants._in_flight}")
    async with httpx.AsyncClient(base_url=http_url, timeout=30) as http:
        m = parse_metrics((await http.get("/metrics")).text)
    for gauge in ("agentserve_num_requests_running", "agentserve_num_requests_waiting",
                  "agentserve_kv_cache_pages_used", "agentserve_kv_cache_usage_ratio"):
        if m.get(gauge) != 0:
            bad.append(f"/metrics {gauge} = {m.get(gauge)} when idle")
    return bad


def live_thread_names() -> list[str]:
    return sorted(t.name for t in threading.enumerate())


def growth(first: Snapshot, second: Snapshot, outside_threads: list[str], rss_slack: int = 48 * 2**20) -> list[str]:
    """What grew from one identical round to the next; outside_threads lived in the process before the
    server started (other tests' engines and clients), so they do not count against its bound."""
    bad = []
    if second.tasks != first.tasks:
        bad.append(f"asyncio tasks changed: {first.tasks} -> {second.tasks}")
    # Executor pools ("<prefix>_<n>") start their workers lazily up to a fixed bound: a pool may
    # grow, but no new kind of thread may appear, and the server's own threads stay within the pools' bounds.
    kinds = [{re.sub(r"_\d+$", "", name) for name in snap.threads} for snap in (first, second)]
    own = Counter(second.threads) - Counter(outside_threads)
    if kinds[1] - kinds[0] or sum(own.values()) > MAX_SERVER_THREADS:
        bad.append(f"threads grew: {first.threads} -> {second.threads} (the server's own: {sorted(own.elements())}, "
                   f"bound {MAX_SERVER_THREADS})")
    for name, n in second.objects.items():
        if n > first.objects[name]:
            bad.append(f"{name} objects grew: {first.objects[name]} -> {n}")
    if second.rss - first.rss > rss_slack:
        bad.append(f"RSS grew by {(second.rss - first.rss) / 2**20:.1f} MiB")
    if second.adapters != first.adapters:
        bad.append(f"loaded adapters changed: {first.adapters} -> {second.adapters}")
    return bad


def counters(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    keys = ("agentserve_requests_finished_total", "agentserve_prompt_tokens_total",
            "agentserve_generation_tokens_total")
    return {k: after.get(k, 0.0) - before.get(k, 0.0) for k in keys}


async def scrape(http_url: str) -> dict[str, float]:
    async with httpx.AsyncClient(base_url=http_url, timeout=30) as http:
        return parse_metrics((await http.get("/metrics")).text)


def engine_counters(handle: ServerHandle) -> dict[str, Any]:
    m = handle.engine.metrics
    return {"finished": m.requests_finished_total, "prompt": m.prompt_tokens_total,
            "generation": m.generation_tokens_total}


async def dump_tasks_when_stalled(seconds: float, describe: Callable[[], str]) -> None:
    """A watchdog for a body that may hang (an await nobody wakes, or a step loop that spins without
    progress): after `seconds`, prints each pending asyncio task's stack and `describe()` (the engine's
    state, read racily from this thread: for diagnosis only) to stderr, so the test's output names it."""
    await asyncio.sleep(seconds)
    me = asyncio.current_task()
    out = [f"--- stalled after {seconds:.0f} s: pending asyncio tasks ---"]
    for task in asyncio.all_tasks():
        if task is me or task.done():
            continue
        out.append(f"task {task.get_name()} ({task.get_coro().__qualname__}):")
        out += ["  " + where for where in await_chain(task.get_coro())]
    try:
        out.append("--- engine ---\n" + describe())
    except Exception as e:  # noqa: BLE001
        out.append(f"--- engine: describe failed: {type(e).__name__}: {e}")
    print("\n".join(out), file=sys.stderr, flush=True)


def await_chain(coro: Any) -> list[str]:
    """Where a suspended coroutine waits: its frame, then each coroutine or generator it awaits
    (Task.get_stack shows only the outermost frame; Cython coroutines, grpc.aio's, have none)."""
    chain = []
    while coro is not None and len(chain) < 40:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None) or getattr(coro, "ag_frame", None)
        chain.append(f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}" if frame is not None
                     else f"<{type(coro).__name__}>")
        coro = (getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
                or getattr(coro, "ag_await", None))
    return chain


def engine_state(engine: Any) -> str:
    """The step thread's queues and each held request's progress (racy: see dump_tasks_when_stalled)."""
    sched = engine.scheduler

    def row(r: Request) -> str:
        return (f"{r.request_id} {r.status.name} computed {r.num_computed_tokens}/{r.num_tokens} "
                f"(prompt {len(r.prompt_token_ids)}, out {len(r.output_token_ids)}, placeholders "
                f"{r.num_output_placeholders}) pages {len(r.block_table)} spec {len(r.spec_token_ids)} "
                f"draft computed {r.num_draft_computed_tokens} lora {r.lora_name} preempted {r.num_preemptions}")

    lines = [f"groups {len(engine.groups)}, waiting {len(sched.waiting)}, running {len(sched.running)}, "
             f"free pages {sched.kv.pool.num_free_blocks}, device ops {sched.has_device_ops()}"]
    lines += [f"  group {gid}: " + "; ".join(row(r) for r in reqs) for gid, reqs in list(engine.groups.items())]
    lines += ["  waiting " + row(r) for r in list(sched.waiting)]
    lines += ["  running " + row(r) for r in list(sched.running)]
    return "\n".join(lines)
