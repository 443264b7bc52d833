"""Sessions cannot get stuck (issue 10): a turn cancelled at any point — while its set-up is queued
or running on the step thread, queued for admission, mid-prefill, mid-decode — or whose session is
closed under it, rolls back or completes. Afterwards no session is busy (the next turn and fork
work), and once every session is closed every KV page and swap slot is free."""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentserve.engine.async_engine import AsyncEngine
from agentserve.sampling_params import SamplingParams
from agentserve.service import agent_pb2 as pb
from agentserve.sessions.store import SessionStore
from agentserve.sessions.types import PendingTurn, SessionNotFoundError, TurnCancelledError
from conftest_grpc import make_engine, serving, swap_gb_for

SYSTEM = {"role": "system", "content": "You are terse."}
MAX_SESSION_TOKENS = 500  # a session past this is closed and replaced (max_model_len is 1024)


class SlowSetupStore(SessionStore):
    """Makes a turn's set-up on the step thread take `setup_delay` seconds, as rendering a long
    conversation does, so that a cancellation lands while it runs."""

    setup_delay = 0.0

    # The set-up runs on the step thread in two calls around the off-thread rendering: the first
    # marks the session busy, the second adopts the rendered prompt. Either may be cancelled under.
    def _reserve_turn(self, session_id: str, params: SamplingParams, expected_next_turn_ms: float,
                      received_at: float) -> tuple[PendingTurn, Any]:
        if self.setup_delay:
            time.sleep(self.setup_delay / 2)
        return super()._reserve_turn(session_id, params, expected_next_turn_ms, received_at)

    def _begin_turn(self, pending: PendingTurn, rendered: Any) -> PendingTurn:
        if self.setup_delay:
            time.sleep(self.setup_delay / 2)
        return super()._begin_turn(pending, rendered)


@pytest.fixture(scope="module")
def aeng() -> Any:
    engine = make_engine(num_blocks=64, max_model_len=1024, swap_space_gb=swap_gb_for("qwen2", 24))
    yield engine
    engine.shutdown()


async def _consume(store: SessionStore, sid: str, i: int, max_tokens: int) -> None:
    async for _ in store.turn(sid, [{"role": "user", "content": f"Step {i}: go on."}],
                              SamplingParams(temperature=0.0, max_tokens=max_tokens)):
        pass


async def _assert_settled(aeng: AsyncEngine, store: SessionStore) -> None:
    # One step-thread round trip: undo commands queued by cancellations have run after it.
    await aeng.run(lambda: None)
    busy = [s.session_id for s in store.sessions.values() if s.busy is not None]
    assert busy == [], f"sessions left busy: {busy}"
    assert store._pending == {}
    assert not aeng.engine.has_unfinished()


# An op: (kind, delay in seconds, set-up delay in seconds, max_tokens).
Op = tuple[str, float, float, int]
OPS = st.tuples(st.sampled_from(["timeout", "timeout", "timeout", "close_during", "turn", "fork"]),
                st.floats(min_value=0.0, max_value=0.06), st.sampled_from([0.0, 0.0, 0.005, 0.02]),
                st.integers(min_value=1, max_value=12))


async def _agent(aeng: AsyncEngine, store: SlowSetupStore, ops: list[Op], counts: dict[str, int]) -> None:
    sid = (await store.create([SYSTEM])).session_id
    for i, (kind, delay, setup_delay, max_tokens) in enumerate(ops):
        store.setup_delay = setup_delay
        if kind == "timeout":
            try:
                await asyncio.wait_for(_consume(store, sid, i, max_tokens), delay)
                counts["completed"] += 1
            except (asyncio.TimeoutError, TurnCancelledError):
                counts["cancelled"] += 1
        elif kind == "close_during":
            turn = asyncio.ensure_future(_consume(store, sid, i, max_tokens))
            await asyncio.sleep(delay)
            await store.close(sid)
            try:
                await turn
                counts["completed"] += 1
            except (SessionNotFoundError, TurnCancelledError):  # closed before its set-up ran, or during the turn
                counts["closed_under"] += 1
            sid = (await store.create([SYSTEM])).session_id
        elif kind == "turn":  # never FAILED_PRECONDITION: a cancelled turn never leaves the session busy
            await _consume(store, sid, i, max_tokens)
            counts["completed"] += 1
        else:
            child = await store.fork(sid)
            await _consume(store, child.session_id, i, 2)
            await store.close(child.session_id)
        if (await store.get(sid)).num_tokens > MAX_SESSION_TOKENS:
            await store.close(sid)
            sid = (await store.create([SYSTEM])).session_id
    store.setup_delay = 0.0


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.lists(OPS, min_size=4, max_size=10), min_size=1, max_size=3))
def test_random_cancellation_points_never_leave_a_session_busy(aeng: AsyncEngine, agents: list[list[Op]]) -> None:
    counts = {"completed": 0, "cancelled": 0, "closed_under": 0}

    async def body() -> None:
        store = SlowSetupStore(aeng)
        try:
            await asyncio.gather(*(_agent(aeng, store, ops, counts) for ops in agents))
            await _assert_settled(aeng, store)
            # Every session that is left takes another turn and forks: none is stuck.
            for sid in list(store.sessions):
                await _consume(store, sid, 99, 1)
                await store.close((await store.fork(sid)).session_id)
            await store.close_all()
            await _assert_settled(aeng, store)
            assert len(store) == 0
            assert store.num_free_swap_slots == store.num_swap_slots
            await aeng.run(aeng.engine.pool.check_all_free)
        finally:
            store.detach()

    asyncio.run(asyncio.wait_for(body(), 120))
    turns = sum(1 for ops in agents for op in ops if op[0] != "fork")
    assert sum(counts.values()) == turns, counts  # every turn ended one of the three ways


def test_cancel_while_setup_runs_on_the_step_thread(aeng: AsyncEngine) -> None:
    """The case issue 10 reproduced: the cancel lands while the turn's set-up runs on the step
    thread (a running step-thread call cannot be stopped, so it marks the session busy)."""

    async def body() -> None:
        store = SlowSetupStore(aeng)
        try:
            sid = (await store.create([SYSTEM])).session_id
            for i in range(20):
                store.setup_delay = 0.03
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(_consume(store, sid, i, 4), 0.01)
                store.setup_delay = 0.0
                await _assert_settled(aeng, store)
            await _consume(store, sid, 20, 2)
            snap = await store.get(sid)
            assert snap.num_turns == 1 and not snap.busy
            # CloseSession of a busy session frees every page at once, also when its caller is cancelled.
            turn = asyncio.ensure_future(_consume(store, sid, 21, 200))
            while not (await store.get(sid)).busy:
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.05)  # mid-decode
            closing = asyncio.ensure_future(store.close(sid))
            await asyncio.sleep(0)
            await aeng.run(lambda: None)  # the close ran on the step thread; its caller has not resumed
            closing.cancel()
            with pytest.raises(TurnCancelledError):
                await asyncio.wait_for(turn, 30)
            await _assert_settled(aeng, store)
            await aeng.run(aeng.engine.pool.check_all_free)
        finally:
            store.detach()

    asyncio.run(asyncio.wait_for(body(), 120))


def test_grpc_turns_with_random_deadlines(aeng: AsyncEngine) -> None:
    """Through the real server: Turn with deadlines of 1-50 ms, and CloseSession with a 2 ms deadline
    while a turn runs. No later Turn or Fork gets FAILED_PRECONDITION; every page is free at the end."""
    rng = random.Random(10)
    codes: dict[str, int] = {}

    async def body() -> None:
        async with serving(aeng) as (handle, client):
            sess = await client.create_session([SYSTEM])
            for i in range(120):
                timeout = rng.choice([rng.uniform(0.001, 0.01), rng.uniform(0.001, 0.05)])
                try:
                    async for _ in sess.turn([{"role": "user", "content": f"q{i}"}], timeout=timeout,
                                             max_tokens=rng.randint(1, 8), temperature=0.0):
                        pass
                    codes["OK"] = codes.get("OK", 0) + 1
                except grpc.aio.AioRpcError as e:
                    codes[e.code().name] = codes.get(e.code().name, 0) + 1
                info = await sess.refresh()
                if i % 10 == 9 or info.num_tokens > MAX_SESSION_TOKENS:
                    child = await sess.fork()
                    await child.run_turn([{"role": "user", "content": "and?"}], max_tokens=1)
                    await child.close()
                    events = sess.turn([{"role": "user", "content": "long"}], max_tokens=200, temperature=0.0,
                                       ignore_eos=True)
                    await events.__anext__()  # the turn is running when the session is closed
                    with contextlib.suppress(grpc.aio.AioRpcError):
                        await client.stub.CloseSession(pb.CloseSessionRequest(session_id=sess.id),
                                                       metadata=client.metadata, timeout=0.002)
                    try:  # done, or cancelled by the close (when it reached the server within 2 ms)
                        async for _ in events:
                            pass
                    except grpc.aio.AioRpcError as e:
                        assert e.code() == grpc.StatusCode.CANCELLED, e
                        codes["closed_under"] = codes.get("closed_under", 0) + 1
                    with contextlib.suppress(grpc.aio.AioRpcError):
                        await sess.close()
                    sess = await client.create_session([SYSTEM])
            await sess.close()
            health = await client.health()
            assert health.num_sessions == 0, health
        await aeng.run(lambda: None)
        assert not aeng.engine.has_unfinished()
        await aeng.run(aeng.engine.pool.check_all_free)

    asyncio.run(asyncio.wait_for(body(), 240))
    assert codes.get("FAILED_PRECONDITION", 0) == 0, codes
    assert codes.get("DEADLINE_EXCEEDED", 0) > 10 and codes.get("OK", 0) > 0, codes


@pytest.mark.parametrize("next_call", ["turn", "fork"])
def test_next_turn_sent_right_after_a_cancel_is_not_refused_as_busy(aeng: AsyncEngine, next_call: str) -> None:
    """A client leaves a streaming turn and at once sends the next turn (or a fork). The server has
    seen the cancel (the turn's task is done) but the roll-back it queued on the step thread is
    still behind the new call's set-up: the new call must not get SessionBusyError (gRPC
    FAILED_PRECONDITION) for a turn its client has left. The step thread is held so that the
    commands queue in exactly the order the race produces: the cancelled request's abort, the new
    call's reserve, then the cancelled turn's roll-back."""

    async def body() -> None:
        store = SessionStore(aeng)
        try:
            sid = (await store.create([SYSTEM])).session_id
            events = store.turn(sid, [{"role": "user", "content": "Talk."}],
                                SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True))
            await events.__anext__()  # mid-decode
            pending = store.sessions[sid].busy
            assert pending is not None and pending.task is not None
            hold = threading.Event()
            aeng.call_soon(hold.wait)  # the step thread runs no command until released
            await asyncio.sleep(0.05)
            pending.task.cancel()  # what leaving the stream does (the generator's finally)
            follow = (asyncio.ensure_future(_consume(store, sid, 1, 2)) if next_call == "turn"
                      else asyncio.ensure_future(store.fork(sid)))
            for _ in range(20):  # the task's cancellation and its done-callback run; the commands queue up
                await asyncio.sleep(0)
            assert pending.task.done() and not follow.done()
            hold.set()
            await asyncio.wait_for(follow, 30)  # SessionBusyError before the fix
            await events.aclose()
            await _assert_settled(aeng, store)
            for s in list(store.sessions):
                await store.close(s)
            await aeng.run(aeng.engine.pool.check_all_free)
        finally:
            store.detach()

    asyncio.run(asyncio.wait_for(body(), 120))
