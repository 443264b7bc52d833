"""A leak and invariant soak of a live server (gRPC + HTTP in one loop, one engine): a seeded mix of
concurrent clients (official `openai` client streaming and not, n > 1, logprobs, tool calls with
tool_choice required, json_schema, Responses chains, Anthropic messages streamed or not, gRPC sessions with turns, forks and closes,
Generate, HTTP disconnects, cancelled turns, expiring deadlines, adapters loaded and unloaded
mid-run) on a tiny llama with a small KV pool (preemption, session swap) and LoRA, with and without
speculation. After each round stops and every session is closed (through ListSessions /
CloseSession) or has expired, the server must be exactly idle: every page free, swap slots free,
no request, stream, compile, pinned adapter or tenant slot left, /metrics gauges at idle, the
counters equal to what the clients saw, and nothing (tasks, threads, per-request objects, RSS)
growing from one identical round to the next."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest

from agentserve.adapters.client import AgentClient
from agentserve.testing import tiny_model_cached
from conftest_grpc import make_engine, run_and_shutdown, serving, swap_gb_for
from helpers.lora import ALL_MODULES, build_peft_adapter
from helpers.soak_checks import (check_idle, close_all_sessions, count_objects, counters, dump_tasks_when_stalled,
                                 engine_counters, engine_state, growth, live_thread_names, scrape, snapshot, wait_idle)
from helpers.soak_load import Server, Tally, drive

ARCH = "llama3"
SEED = 1234
SPECS: dict[str, dict[str, Any]] = {
    "plain": {},
    "ngram": dict(speculative_method="ngram", num_speculative_tokens=3, prompt_lookup_min=1, prompt_lookup_max=3),
    # The draft is the model itself (draft_model is filled in by _soak, so collecting builds no model): every
    # proposal accepted, continuations queued behind each verification.
    "draft": dict(num_speculative_tokens=3, spec_dynamic=False),
}
DRAFT_IS_TARGET = {"draft"}
# A stalled soak fails after this long, printing its pending asyncio tasks and the engine's queues first (the
# n-gram variant's stall, a session turn waiting for ever on a full pool, was found so: twenty-sixth session).
STALL_SECONDS = float(os.environ.get("AGENTSERVE_SOAK_STALL_SECONDS", "360"))
# Every engine soaks short by default: a long soak costs ~100-135 s of make test's 30 minutes in CI (twenty-eighth
# session: 1,738 s of 1,800; the plain engine's, the last one kept, ran 2,032 s in CI with the rest of s36's tree).
# An engine soaked long is not soaked short as well (the long round is the short one with more clients and
# operations). AGENTSERVE_LONG_SOAKS=plain,ngram,draft runs them long.
LONG_SPECS = [s for s in os.environ.get("AGENTSERVE_LONG_SOAKS", "").split(",") if s]
assert set(LONG_SPECS) <= set(SPECS), f"AGENTSERVE_LONG_SOAKS names {LONG_SPECS}; the soaks are {list(SPECS)}"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    base = tiny_model_cached(ARCH)
    root = tmp_path_factory.mktemp("soak-adapters")
    return {name: str(build_peft_adapter(base, root / name, seed=40 + i, r=4, lora_alpha=8,
                                         target_modules=list(ALL_MODULES), scale=4.0))
            for i, name in enumerate(("a", "b", "spare"))}


async def _round(handle: Any, server: Server, seed: int, clients: int, ops: int) -> tuple[Tally, list[str]]:
    """One round of load, then every session closed and the server idle; returns the tally and the
    invariants the idle server breaks."""
    tally = await drive(server, seed, clients, ops)
    async with AgentClient(server.grpc_address) as agent:
        await asyncio.sleep(2.5)  # the short-TTL sessions expire on their own
        await close_all_sessions(agent)
    bad = await wait_idle(handle)
    bad += await check_idle(handle, server.http_url)
    return tally, bad


def _soak(spec: str, adapters: dict[str, str], clients: int, ops: int) -> None:
    speculation = dict(SPECS[spec], **({"draft_model": str(tiny_model_cached(ARCH))} if spec in DRAFT_IS_TARGET else {}))
    outside = count_objects()  # held by whatever else lives in this process (other tests' engines)
    outside_threads = live_thread_names()
    aeng = make_engine(ARCH, enable_lora=True, max_loras=2, max_cpu_loras=2, max_lora_rank=8, num_blocks=32,
                       max_model_len=512, swap_space_gb=swap_gb_for(ARCH, 12), served_model_name="base",
                       lora_modules={"a": adapters["a"], "b": adapters["b"]}, max_num_seqs=8, decode_reserve_tokens=8,
                       **speculation)

    async def body() -> None:
        soak = asyncio.create_task(soak_body())
        watchdog = asyncio.create_task(dump_tasks_when_stalled(STALL_SECONDS, lambda: engine_state(aeng.engine)))
        await asyncio.wait({soak, watchdog}, return_when=asyncio.FIRST_COMPLETED)
        if not soak.done():  # the watchdog printed where it stands: fail now, not at the run's limit
            soak.cancel()
            raise AssertionError(f"the soak stalled for {STALL_SECONDS:.0f} s (pending tasks and engine state on stderr)")
        watchdog.cancel()
        await soak

    async def soak_body() -> None:
        async with serving(aeng, http_port=0, expiry_interval=0.2) as (handle, _):
            server = Server(http_url=f"http://127.0.0.1:{handle.http_port}", grpc_address=handle.address,
                            adapters={"a": adapters["a"], "b": adapters["b"]}, spare_adapter=adapters["spare"])
            violations: list[str] = []
            seen = Tally()  # the mixed rounds' outcomes, all together
            # Round 0 warms up: lazily built state (grammar compiler, metrics, CPU tier, pool threads).
            snapshots = []
            for r, seed in enumerate((SEED, SEED + 1, SEED + 1)):  # rounds 1 and 2 are identical
                tally, bad = await _round(handle, server, seed, clients, ops)
                seen.ops.update(tally.ops)
                seen.expected_errors.update(tally.expected_errors)
                violations += [f"round {r}: {b}" for b in bad] + [f"round {r}: client saw {f}" for f in tally.failures]
                snapshots.append(snapshot(handle))
            last = snapshots[-1]
            violations += growth(snapshots[1], last, outside_threads)  # nothing may grow from one identical round to the next
            if any(n > outside[name] for name, n in last.objects.items()):  # every request and session is gone
                violations.append(f"an idle server holds per-request objects: {last.objects} ({outside} "
                                  "were alive before it started)")
            # The mix did reach what it is for (else the invariants above were checked on too little).
            stats, preempted = handle.store.stats, handle.engine.metrics.num_preemptions_total
            print(f"soak[{spec}]: ops {dict(seen.ops)}, expected errors {dict(seen.expected_errors)}, "
                  f"preemptions {preempted}, swap outs {stats.swap_outs}, drops {stats.drops}, "
                  f"rolled back {stats.rolled_back}, expired {stats.expired}")
            assert stats.swap_outs + stats.drops > 0, "no memory pressure: the pool is too large"
            assert seen.expected_errors["grpc:DEADLINE_EXCEEDED"] > 0 and stats.rolled_back > 0, seen
            # Accounting: a stateless round without aborts; the counters move by exactly what the clients saw.
            before, engine_before = await scrape(server.http_url), engine_counters(handle)
            stateless = Server(**{**server.__dict__, "aborts": False, "stateless_only": True})
            # Half the operations: the counters' check needs every kind of request, not the mixed rounds' volume.
            tally, bad = await _round(handle, stateless, SEED + 2, clients, max(ops // 2, 6))
            violations += [f"accounting round: {b}" for b in bad] + tally.failures
            delta = counters(before, await scrape(server.http_url))
            engine_after = engine_counters(handle)
            want = {"agentserve_requests_finished_total": tally.completed_stateless,
                    "agentserve_prompt_tokens_total": tally.prompt_tokens,
                    "agentserve_generation_tokens_total": tally.completion_tokens}
            if delta != want:
                violations.append(f"counters moved by {delta}, clients saw {want} "
                                  f"(engine {engine_before} -> {engine_after})")
            assert not violations, "\n".join(violations)

    run_and_shutdown(aeng, body(), timeout=600)


@pytest.mark.parametrize("spec", [s for s in SPECS if s not in LONG_SPECS])  # each engine soaks once, long or short
def test_soak_leaves_the_server_as_it_found_it(spec: str, adapters: dict[str, str]) -> None:
    _soak(spec, adapters, clients=3, ops=12)


@pytest.mark.slow
@pytest.mark.parametrize("spec", LONG_SPECS)
def test_long_soak_leaves_the_server_as_it_found_it(spec: str, adapters: dict[str, str]) -> None:
    # 5 clients x 28 operations a round (was 6 x 40; thirty-sixth session: the suite ran 1,879 s alone on a slow
    # day here and CI has run it 20% slower than this machine): still ~4x the short soak's operations.
    _soak(spec, adapters, clients=5, ops=28)
