"""Sessions over a real gRPC server on loopback (tiny qwen2, CPU), greedy:
- every turn's reply equals a stateless generate over the turn's whole prompt (no prefix cache),
  across turns, after a fork (parent and child), after swap-out/swap-in and after eviction+recompute;
- turn 2..k prefill only the new messages' tokens (+1: the previous reply's last token, whose KV is
  computed with the next turn) and report the rest as cached;
- sessions with the same system prompt and tools hold those pages once (prefix cache);
- idle sessions past their expected-next-turn hint give up their pages first.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from agentserve.service import agent_pb2 as pb
from conftest_grpc import SYSTEM, TOOLS, make_engine, model_path, reference, run_and_shutdown, serving, swap_gb_for

GREEDY = dict(temperature=0.0, max_tokens=8, return_token_ids=True)
BS = 16
NEW_MESSAGES: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Find the weather in Paris and read notes.txt."}],
    [{"role": "tool", "tool_call_id": "c1", "content": '{"temperature": 21, "conditions": "sunny"}'}],
    [{"role": "tool", "tool_call_id": "c2", "content": "buy milk\nwalk the dog\n" * 4}],
    [{"role": "user", "content": "Thanks! Now summarise both in one sentence."}],
]


def _check_every_proposal_accepted(aeng: Any, spec: str) -> None:
    """With SPEC's draft (the target's own weights) every proposal is accepted: a session's pages that lost or
    staled the draft's KV would show as rejected proposals."""
    m = aeng.engine.metrics
    assert not SPEC[spec] or m.spec_num_accepted_tokens == m.spec_num_draft_tokens > 0


def _check_exact(turns: list[Any], tools: Any = TOOLS) -> None:
    prompts = [list(t.done.prompt_token_ids) for t in turns]
    assert reference(prompts, GREEDY["max_tokens"], tools=tools) == [t.token_ids for t in turns]


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_turns_are_exact_and_prefill_only_new_tokens(async_scheduling: bool) -> None:
    # (async scheduling is the default on CUDA only; here it runs the same logic on the CPU)
    aeng = make_engine(async_scheduling=async_scheduling)

    async def body() -> None:
        async with serving(aeng) as (handle, client):
            session = await client.create_session([SYSTEM], tools=TOOLS)
            assert session.info.state == pb.SESSION_STATE_NEW
            turns = []
            for k, new in enumerate(NEW_MESSAGES):
                t = await session.run_turn(new, **GREEDY)
                u, prompt = t.done.usage, list(t.done.prompt_token_ids)
                assert u.prompt_tokens == len(prompt) and u.completion_tokens == len(t.token_ids) == 8
                assert u.cached_tokens + u.prefilled_tokens == u.prompt_tokens
                if k == 0:
                    assert u.cached_tokens == 0  # a fresh engine: nothing cached yet
                else:
                    prev = turns[-1]
                    held = len(prev.done.prompt_token_ids) + len(prev.token_ids)
                    assert prompt[:held] == list(prev.done.prompt_token_ids) + prev.token_ids
                    new_tokens = len(prompt) - held
                    # the new messages' tokens plus the previous reply's last token (at most one page)
                    assert u.prefilled_tokens == new_tokens + 1 <= new_tokens + BS
                    assert u.cached_tokens == held - 1
                tm = t.done.timing
                assert 0 < tm.ttft_ms <= tm.total_ms and tm.queue_ms >= 0 and tm.prefill_ms > 0 and tm.decode_ms > 0
                info = t.done.session
                assert info.state == pb.SESSION_STATE_RESIDENT and info.num_turns == k + 1
                assert info.num_tokens == len(prompt) + 8 and info.num_kv_tokens == info.num_tokens - 1
                assert info.num_pages == -(-info.num_kv_tokens // BS)
                turns.append(t)
            await session.close()
        _check_exact(turns)

    run_and_shutdown(aeng, body(), timeout=120)


# Speculation with the target as its own draft: the sessions' pages hold the draft's KV too, and swap,
# fork and eviction move both (outputs must stay exact; every draft is accepted).
SPEC = {"plain": {}, "spec": dict(draft_model=model_path("qwen2"), spec_dynamic=False)}


@pytest.mark.parametrize("spec", SPEC)
def test_fork_shares_pages_and_both_branches_stay_exact(spec: str) -> None:
    aeng = make_engine(**SPEC[spec])
    pool = aeng.engine.pool

    async def body() -> None:
        async with serving(aeng) as (handle, client):
            parent = await client.create_session([SYSTEM], tools=TOOLS)
            turns = [await parent.run_turn(NEW_MESSAGES[0], **GREEDY), await parent.run_turn(NEW_MESSAGES[1], **GREEDY)]
            used = pool.num_used_blocks
            child = await parent.fork(metadata={"branch": "b"})
            assert child.info.parent_id == parent.id and child.info.metadata["branch"] == "b"
            assert child.info.num_tokens == parent.info.num_tokens and child.info.num_pages == parent.info.num_pages
            assert pool.num_used_blocks == used  # every page shared, nothing copied
            grandchild = await child.fork()
            # both branches continue; the shared partial last page is copied on the first write only
            a = await parent.run_turn(NEW_MESSAGES[2], **GREEDY)
            b = await child.run_turn(NEW_MESSAGES[3], **GREEDY)
            c = await grandchild.run_turn(NEW_MESSAGES[2], **GREEDY)
            held = parent.info.num_kv_tokens
            for t in (b,):
                assert t.done.usage.cached_tokens == turns[-1].done.usage.prompt_tokens + 8 - 1
            assert a.done.usage.cached_tokens == b.done.usage.cached_tokens == c.done.usage.cached_tokens
            assert held > 0
            # same history + same new messages on two branches: the same reply
            assert a.token_ids == c.token_ids and list(a.done.prompt_token_ids) == list(c.done.prompt_token_ids)
            a2 = await parent.run_turn(NEW_MESSAGES[3], **GREEDY)
            b2 = await child.run_turn(NEW_MESSAGES[0], **GREEDY)
            turns += [a, b, c, a2, b2]
            for s in (parent, child, grandchild):
                await s.close()
        _check_exact(turns)

    run_and_shutdown(aeng, body(), timeout=120)
    _check_every_proposal_accepted(aeng, spec)


async def _pressure(client: Any, pages: int, salt: str) -> None:
    """A stateless request that needs `pages` pages: the scheduler reclaims idle sessions' pages."""
    prompt = [(7 * i + len(salt)) % 500 + 3 for i in range(pages * BS - 8)]
    done = await client.generate_done(prompt_token_ids=prompt, max_tokens=8, temperature=0, ignore_eos=True,
                                      cache_salt=salt)
    assert len(done.token_ids) == 8


@pytest.mark.parametrize("spec", SPEC)
def test_swap_out_and_in_is_exact(spec: str) -> None:
    aeng = make_engine(num_blocks=48, max_model_len=720, **SPEC[spec])
    pool = aeng.engine.pool

    async def body() -> None:
        async with serving(aeng) as (handle, client):
            session = await client.create_session([SYSTEM], tools=TOOLS)
            turns = [await session.run_turn(NEW_MESSAGES[0], **GREEDY), await session.run_turn(NEW_MESSAGES[1], **GREEDY)]
            held = (await session.refresh()).num_pages
            assert held >= pool.num_blocks // 3
            await _pressure(client, pool.num_blocks - held + 4, "p1")  # needs some of the session's pages
            info = await session.refresh()
            assert info.state == pb.SESSION_STATE_SWAPPED and info.num_pages == 0
            assert info.num_swapped_pages == held and info.num_kv_tokens == turns[-1].done.session.num_kv_tokens
            assert handle.store.stats.swap_outs == 1
            t = await session.run_turn(NEW_MESSAGES[2], **GREEDY)
            u = t.done.usage
            assert t.done.session.state == pb.SESSION_STATE_RESIDENT
            assert u.swapped_in_tokens == info.num_kv_tokens == u.cached_tokens
            assert u.prefilled_tokens == u.prompt_tokens - u.cached_tokens
            assert t.done.timing.swap_in_ms > 0
            turns.append(t)
            # once more, then a fork of a swapped session (restored first)
            await _pressure(client, pool.num_blocks - t.done.session.num_pages + 4, "p2")
            assert (await session.refresh()).state == pb.SESSION_STATE_SWAPPED
            child = await session.fork()
            assert child.info.state == pb.SESSION_STATE_RESIDENT
            turns.append(await child.run_turn(NEW_MESSAGES[3], **GREEDY))
            turns.append(await session.run_turn(NEW_MESSAGES[3], **GREEDY))
            assert turns[-1].token_ids == turns[-2].token_ids
            assert handle.store.stats.swap_ins == 2
            await child.close()
            await session.close()
            assert handle.store.num_free_swap_slots == handle.store.num_swap_slots
        _check_exact(turns)

    run_and_shutdown(aeng, body(), timeout=120)
    _check_every_proposal_accepted(aeng, spec)


@pytest.mark.parametrize("spec", SPEC)
def test_eviction_without_swap_recomputes_exactly(spec: str) -> None:
    # Swap space for 3 pages only: a session holding more is dropped, then recomputed on its next turn
    # (its full pages still hit the prefix cache until reused). A self draft doubles a page's bytes.
    pages = 3 * (2 if SPEC[spec] else 1)
    aeng = make_engine(num_blocks=48, max_model_len=768, swap_space_gb=swap_gb_for("qwen2", pages), **SPEC[spec])
    pool = aeng.engine.pool

    async def body() -> None:
        async with serving(aeng) as (handle, client):
            assert handle.store.num_swap_slots == 3
            session = await client.create_session([SYSTEM], tools=TOOLS)
            turns = [await session.run_turn(NEW_MESSAGES[0], **GREEDY), await session.run_turn(NEW_MESSAGES[1], **GREEDY)]
            held = (await session.refresh()).num_pages
            await _pressure(client, pool.num_blocks - held + 4, "p1")
            info = await session.refresh()
            assert info.state == pb.SESSION_STATE_EVICTED and info.num_pages == 0 and info.num_kv_tokens == 0
            assert handle.store.stats.drops == 1
            t = await session.run_turn(NEW_MESSAGES[2], **GREEDY)
            u = t.done.usage
            # the pressure request took only some pages: the rest of the history hit the prefix cache
            assert 0 < u.cached_tokens < turns[-1].done.session.num_kv_tokens
            assert u.cached_tokens % BS == 0 and u.swapped_in_tokens == 0
            turns.append(t)
            # pressure that overwrites everything: a full recompute, still exact
            await _pressure(client, pool.num_blocks, "p2")
            assert (await session.refresh()).state == pb.SESSION_STATE_EVICTED
            t = await session.run_turn(NEW_MESSAGES[3], **GREEDY)
            assert t.done.usage.cached_tokens == 0 and t.done.usage.prefilled_tokens == t.done.usage.prompt_tokens
            turns.append(t)
            await session.close()
        _check_exact(turns)

    run_and_shutdown(aeng, body(), timeout=120)
    _check_every_proposal_accepted(aeng, spec)


def test_shared_preamble_is_held_once() -> None:
    aeng = make_engine(num_blocks=256)
    pool = aeng.engine.pool
    system = {"role": "system", "content": "You are one of many identical agents. " + "Rules: be brief. " * 60}
    n = 12

    async def body() -> None:
        async with serving(aeng) as (handle, client):
            sessions = [await client.create_session([system], tools=TOOLS) for _ in range(n)]
            preamble_tokens = sessions[0].info.num_tokens
            assert preamble_tokens > 300
            results = []
            for i, s in enumerate(sessions):
                results.append(await s.run_turn([{"role": "user", "content": f"Task {i}: check city {i}."}],
                                                **GREEDY))
            full = preamble_tokens // BS * BS
            for r in results[1:]:
                assert r.done.usage.cached_tokens >= full  # the preamble came from the prefix cache
            per_session = max(r.done.session.num_pages for r in results) - preamble_tokens // BS
            assert pool.num_used_blocks <= preamble_tokens // BS + n * per_session
            assert pool.num_used_blocks < n * (preamble_tokens // BS) // 2
            for s in sessions:
                await s.close()
        _check_exact(results)

    run_and_shutdown(aeng, body(), timeout=120)


def test_sessions_past_their_hint_yield_first() -> None:
    aeng = make_engine(num_blocks=64, max_model_len=1024)
    pool = aeng.engine.pool

    async def body() -> None:
        async with serving(aeng) as (handle, client):
            store = handle.store
            late = await client.create_session([SYSTEM])
            soon = await client.create_session([SYSTEM])
            nohint = await client.create_session([SYSTEM])
            def user(name: str) -> list[dict[str, Any]]:
                return [{"role": "user", "content": f"Agent {name}: " + "go on with the plan; " * 12}]

            await nohint.run_turn(user("n"), **GREEDY)                                # least recently used
            await soon.run_turn(user("s"), expected_next_turn_ms=3_600_000, **GREEDY)  # back within an hour
            await late.run_turn(user("l"), expected_next_turn_ms=1, **GREEDY)          # overdue right away
            await asyncio.sleep(0.01)
            order = await aeng.run(lambda: [s.session_id for s in store.residency.eviction_order()])
            assert order == [late.id, nohint.id, soon.id]
            # Real pressure that needs about one session's worth of pages: the overdue one goes first.
            own = await aeng.run(lambda: sum(pool.ref_cnt(b) == 1 for b in store.sessions[late.id].block_table))
            assert own >= 3
            # (the scheduler asks for one page more than it allocates)
            await _pressure(client, pool.num_free_blocks + own - 1, "p")
            states = [(await s.refresh()).state for s in (late, nohint, soon)]
            assert states == [pb.SESSION_STATE_SWAPPED, pb.SESSION_STATE_RESIDENT, pb.SESSION_STATE_RESIDENT]
            for s in (late, soon, nohint):
                await s.close()

    run_and_shutdown(aeng, body(), timeout=120)


def test_partial_swap_leaves_a_shared_preamble_to_the_prefix_cache() -> None:
    # Swap space too small for a whole session but enough for its own pages: the preamble it shares
    # with a resident session stays on the device (prefix cache); swap-in reuses it and copies the rest.
    aeng = make_engine(num_blocks=128, max_model_len=1024, swap_space_gb=swap_gb_for("qwen2", 12))
    system = {"role": "system", "content": "Shared rules for every agent. " + "Be brief and exact. " * 40}

    async def body() -> None:
        async with serving(aeng) as (handle, client):
            store = handle.store
            a = await client.create_session([system], tools=TOOLS)
            b = await client.create_session([system], tools=TOOLS)
            turns = [await a.run_turn(NEW_MESSAGES[0], **GREEDY), await b.run_turn(NEW_MESSAGES[1], **GREEDY)]
            pages = (await a.refresh()).num_pages
            assert pages > store.num_swap_slots
            freed = await aeng.run(lambda: store.residency.evict(store.sessions[a.id]))
            info = await a.refresh()
            assert info.state == pb.SESSION_STATE_SWAPPED and 0 < info.num_swapped_pages < pages
            assert freed == info.num_swapped_pages  # the shared preamble pages are still b's
            t = await a.run_turn(NEW_MESSAGES[2], **GREEDY)
            assert t.done.usage.swapped_in_tokens == info.num_kv_tokens == t.done.usage.cached_tokens
            # full pages still in the prefix cache are reused; at least the partial last page is copied back
            assert store.stats.swap_ins == 1 and 1 <= store.stats.pages_swapped_in <= info.num_swapped_pages
            turns.append(t)
            turns.append(await b.run_turn(NEW_MESSAGES[3], **GREEDY))
            await a.close()
            await b.close()
        _check_exact(turns)

    run_and_shutdown(aeng, body(), timeout=120)


def test_swapped_session_waits_for_pages_instead_of_recomputing() -> None:
    # A running request holds most of the pool: a swapped session's turn waits for it to finish and
    # then swaps in (rather than dropping its swap copy and recomputing).
    aeng = make_engine(num_blocks=48, max_model_len=768)
    pool = aeng.engine.pool

    async def body() -> None:
        async with serving(aeng) as (handle, client):
            session = await client.create_session([SYSTEM], tools=TOOLS)
            turns = [await session.run_turn(NEW_MESSAGES[0], **GREEDY), await session.run_turn(NEW_MESSAGES[1], **GREEDY)]
            held = (await session.refresh()).num_pages
            prompt = [(5 * i) % 400 + 3 for i in range((pool.num_blocks - held + 4) * BS - 200)]
            hog = asyncio.ensure_future(client.generate_done(prompt_token_ids=prompt, max_tokens=150, temperature=0,
                                                             ignore_eos=True))
            while (await session.refresh()).state != pb.SESSION_STATE_SWAPPED:
                assert not hog.done()
                await asyncio.sleep(0.005)
            t = await session.run_turn(NEW_MESSAGES[2], **GREEDY)
            assert hog.done()  # the turn could only start once the hog's pages were back
            assert t.done.timing.swap_wait_ms > 0
            assert t.done.usage.swapped_in_tokens == t.done.usage.cached_tokens > 0
            assert handle.store.stats.swap_in_failures == 0
            turns.append(t)
            await session.close()
        _check_exact(turns)

    run_and_shutdown(aeng, body(), timeout=120)


def test_queued_turns_sessions_yield_to_the_head_of_the_queue() -> None:
    # Three resident sessions fill most of the pool, then all three send a long turn at once. No
    # session is idle, so the head of the queue gets its pages from the sessions whose turns wait
    # behind it (swapped out, and back in when their own turn is admitted): nothing is preempted and
    # every turn stays exact.
    aeng = make_engine(num_blocks=48, max_model_len=768, swap_space_gb=swap_gb_for("qwen2", 64))
    pool = aeng.engine.pool

    async def body() -> None:
        async with serving(aeng) as (handle, client):
            sessions = [await client.create_session([SYSTEM]) for _ in range(3)]
            first = [await s.run_turn([{"role": "user", "content": f"Agent {i}: " + "plan the next step; " * 20}],
                                      **GREEDY) for i, s in enumerate(sessions)]
            held = sum([(await s.refresh()).num_pages for s in sessions])
            assert held > pool.num_blocks // 2
            preempted = aeng.engine.metrics.num_preemptions_total
            long_turn = [{"role": "tool", "tool_call_id": "c1", "content": "row, " * 90}]
            # Hold the step thread for a moment so that all three turns reserve their sessions before
            # the first one is admitted (otherwise a late turn's session is still idle and simply
            # evicted as idle, which is right too but not what this test is about).
            aeng.call_soon(lambda: time.sleep(1.0))
            second = await asyncio.gather(*(s.run_turn(long_turn, **GREEDY) for s in sessions))
            assert handle.store.stats.queued_evicted >= 1
            assert aeng.engine.metrics.num_preemptions_total == preempted
            assert any(t.done.usage.swapped_in_tokens > 0 for t in second)
            for f, t in zip(first, second):  # restored from swap, never recomputed: all but the new tokens cached
                assert t.done.usage.cached_tokens == len(f.done.prompt_token_ids) + len(f.token_ids) - 1
            for s in sessions:
                await s.close()
        _check_exact(first + list(second), tools=None)

    run_and_shutdown(aeng, body(), timeout=120)
