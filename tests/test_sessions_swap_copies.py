"""Swap copies kept after a swap-in (sessions/swap_copies.py): a session swapped out, back in for a turn and
out again copies only the pages written since; the kept copies make later swap-ins exact; an eviction short of
swap slots takes other sessions' kept copies before dropping anyone."""

from __future__ import annotations

from typing import Any

import pytest

from agentserve.service import agent_pb2 as pb
from agentserve.sessions.swap_copies import SwapCopies
from agentserve.sessions.types import Session, SessionState
from conftest_grpc import SYSTEM, TOOLS, make_engine, run_and_shutdown, serving, swap_gb_for
from test_sessions_exactness import BS, GREEDY, NEW_MESSAGES, SPEC, _check_every_proposal_accepted, _check_exact

LONG_RESULT = [{"role": "tool", "tool_call_id": "c3", "content": "row, value, note\n" * 12}]


def _session(name: str, state: SessionState, num_computed: int, pages: int, last_active: float = 0.0) -> Session:
    s = Session(session_id=name, model="m", adapter=None, tools=None, cache_salt=None, raw_tokens=True, ttl=60.0,
                metadata={})
    s.state, s.num_computed, s.block_table, s.last_active = state, num_computed, list(range(100, 100 + pages)), last_active
    return s


def test_kept_copies_cover_only_final_pages_and_are_reused_by_the_next_swap_out() -> None:
    sessions: dict[str, Session] = {}
    copies = SwapCopies(32, sessions, block_size=16, pages_hold_draft=False)
    s = sessions["a"] = _session("a", SessionState.RESIDENT, num_computed=16 * 5 + 3, pages=6)
    # First eviction: pages 1.. (page 0 left to the prefix cache): all five copied.
    assert copies.missing(s, 1, 6) == 5
    assert [page for page, _ in copies.cover(s, 1)] == s.block_table[1:]
    slots = list(s.swap_slots)
    # Back in: the partial last page's copy (page 5) goes; pages 1-4 keep theirs.
    copies.keep_final(s)
    assert (s.swap_from, s.swap_slots) == (1, slots[:4]) and copies.num_free == 32 - 4
    # A turn added two pages; the next eviction (nothing left to the prefix cache this time) copies
    # page 0 and pages 5-7 only, and keeps each kept copy's slot.
    s.block_table, s.num_computed = list(range(200, 208)), 16 * 7 + 9
    assert copies.missing(s, 0, 8) == 4
    to_copy = copies.cover(s, 0)
    assert [page for page, _ in to_copy] == [200, 205, 206, 207]
    assert s.swap_from == 0 and s.swap_slots[1:5] == slots[:4] and len(set(s.swap_slots)) == 8
    # Starting past the kept copies frees the ones before the start.
    copies.keep_final(s)
    assert len(s.swap_slots) == 7
    s.state = SessionState.RESIDENT
    assert copies.cover(s, 3) == [(207, s.swap_slots[-1])] and len(s.swap_slots) == 5 and copies.num_free == 32 - 5


def test_a_draft_bounds_the_final_pages_and_release_takes_the_most_recent_first() -> None:
    sessions: dict[str, Session] = {}
    copies = SwapCopies(8, sessions, block_size=16, pages_hold_draft=True)
    s = sessions["a"] = _session("a", SessionState.RESIDENT, num_computed=64, pages=4, last_active=1.0)
    s.num_draft_computed = 40  # the draft's KV of pages 2-3 is not complete: their copies would go stale
    copies.cover(s, 0)
    copies.keep_final(s)
    assert len(s.swap_slots) == 2
    t = sessions["b"] = _session("b", SessionState.RESIDENT, num_computed=64, pages=4, last_active=2.0)
    t.num_draft_computed = 64
    copies.cover(t, 0)
    copies.keep_final(t)
    assert copies.num_free == 2
    swapped = sessions["c"] = _session("c", SessionState.SWAPPED, num_computed=16, pages=0, last_active=3.0)
    swapped.swap_slots = []
    asking = sessions["d"] = _session("d", SessionState.RESIDENT, num_computed=64, pages=4)
    # b is the most recent holder: its copies go first, and that is enough.
    assert copies.release_others(5, exclude=asking) == 1
    assert t.swap_slots == [] and len(s.swap_slots) == 2 and copies.num_free == 6
    assert copies.release_others(8, exclude=asking) == 1 and copies.num_free == 8


async def _evict(aeng: Any, store: Any, session_id: str) -> None:
    await aeng.run(lambda: store.residency.evict(store.sessions[session_id]))


@pytest.mark.parametrize("spec", SPEC)
def test_a_second_swap_out_copies_only_the_pages_written_since_and_turns_stay_exact(spec: str) -> None:
    # With a draft model (the same weights: it proposes what the target samples) the pages hold the draft's
    # KV too; a stale kept copy would show as a rejected proposal after the second swap-in.
    aeng = make_engine(num_blocks=96, max_model_len=1024, **SPEC[spec])

    async def body() -> None:
        async with serving(aeng) as (handle, client):
            store = handle.store
            stats = store.stats
            session = await client.create_session([SYSTEM], tools=TOOLS)
            turns = [await session.run_turn(NEW_MESSAGES[0], **GREEDY), await session.run_turn(NEW_MESSAGES[1], **GREEDY)]
            await _evict(aeng, store, session.id)
            first = await session.refresh()
            assert first.state == pb.SESSION_STATE_SWAPPED and first.num_swapped_pages == -(-first.num_kv_tokens // BS)
            out1 = stats.pages_swapped_out
            s = store.sessions[session.id]
            draft_at_swap = s.num_draft_computed if SPEC[spec] else s.num_computed
            assert out1 == store.num_swap_slots - store.num_free_swap_slots > 0 and stats.pages_swap_reused == 0
            turns.append(await session.run_turn(LONG_RESULT, **GREEDY))  # swapped in, then extended
            info = await session.refresh()
            kept = len(s.swap_slots)
            assert info.state == pb.SESSION_STATE_RESIDENT and info.num_swapped_pages == 0
            # every page that was full when copied (and, with a draft, held the draft's KV), none after
            assert 0 < kept == min(first.num_kv_tokens, draft_at_swap) // BS
            await _evict(aeng, store, session.id)
            second = await session.refresh()
            assert second.state == pb.SESSION_STATE_SWAPPED and second.num_swapped_pages == second.num_kv_tokens // BS + (
                second.num_kv_tokens % BS > 0)
            assert stats.pages_swap_reused == kept
            assert stats.pages_swapped_out - out1 == second.num_swapped_pages - kept
            turns.append(await session.run_turn(NEW_MESSAGES[3], **GREEDY))  # from the kept and the new copies
            assert stats.swap_ins == 2
            await session.close()
            assert store.num_free_swap_slots == store.num_swap_slots
        _check_exact(turns)

    run_and_shutdown(aeng, body(), timeout=120)
    _check_every_proposal_accepted(aeng, spec)


def test_an_eviction_short_of_slots_takes_kept_copies_before_dropping() -> None:
    # Swap space for one conversation: after a's swap-in kept its copies, b's eviction needs them.
    aeng = make_engine(num_blocks=96, max_model_len=1024, swap_space_gb=swap_gb_for("qwen2", 40))

    async def body() -> None:
        async with serving(aeng) as (handle, client):
            store = handle.store
            a = await client.create_session([SYSTEM], tools=TOOLS)
            b = await client.create_session([{"role": "system", "content": "Other rules. " * 30}], tools=TOOLS)
            turns = [await a.run_turn(NEW_MESSAGES[0], **GREEDY), await b.run_turn(NEW_MESSAGES[0], **GREEDY)]
            await _evict(aeng, store, a.id)
            turns.append(await a.run_turn(NEW_MESSAGES[1], **GREEDY))
            kept = len(store.sessions[a.id].swap_slots)
            b_pages = (await b.refresh()).num_pages
            assert kept > 0 and b_pages <= store.num_swap_slots < kept + b_pages  # the case under test
            await _evict(aeng, store, b.id)
            assert (await b.refresh()).state == pb.SESSION_STATE_SWAPPED
            assert store.stats.swap_copies_released == 1 and store.stats.drops == 0
            assert store.sessions[a.id].swap_slots == []
            turns.append(await b.run_turn(NEW_MESSAGES[1], **GREEDY))
            turns.append(await a.run_turn(NEW_MESSAGES[3], **GREEDY))
            await a.close()
            await b.close()
        _check_exact(turns)

    run_and_shutdown(aeng, body(), timeout=120)


def test_with_kept_copies_off_a_swap_in_frees_every_slot(monkeypatch: pytest.MonkeyPatch) -> None:
    from agentserve.sessions import swap_copies

    monkeypatch.setattr(swap_copies, "KEEP_SWAP_COPIES", False)
    sessions: dict[str, Session] = {}
    copies = SwapCopies(8, sessions, block_size=16, pages_hold_draft=False)
    s = sessions["a"] = _session("a", SessionState.RESIDENT, num_computed=64, pages=4)
    copies.cover(s, 0)
    copies.keep_final(s)
    assert s.swap_slots == [] and copies.num_free == 8
