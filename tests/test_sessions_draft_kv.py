"""A session's pages hold the draft model's KV with the target's (speculative decoding): a turn's draft
computes only the tokens past what the session kept, not the whole history again, while the session
stays resident, after a swap out and in, and in a fork; after a drop (eviction without swap) it starts
over. The target as its own draft accepts every proposal, so KV carried wrongly would show as rejections
(tests/test_sessions_lora_spec.py checks the tokens against stateless runs across the same moves)."""

from __future__ import annotations

from typing import Any, Optional

from agentserve.engine.async_engine import AsyncEngine
from agentserve.engine.engine import Engine
from agentserve.request import Request
from agentserve.sampling_params import SamplingParams
from agentserve.sessions.store import SessionStore
from agentserve.sessions.types import SessionState
from agentserve.spec.draft import DraftModel
from conftest_grpc import make_config, model_path, run_and_shutdown, swap_gb_for
from helpers.session_turns import evict, run_turn

SYSTEM = {"role": "system", "content": "You are a careful agent. Answer briefly."}
GREEDY = SamplingParams(temperature=0.0, max_tokens=8)


def test_turns_draft_only_past_the_history_the_session_kept() -> None:
    aeng = AsyncEngine(Engine(make_config(num_blocks=128, max_model_len=512, swap_space_gb=swap_gb_for("qwen2", 64),
                                          draft_model=model_path(), spec_dynamic=False, num_speculative_tokens=3)))
    draft = aeng.engine.runner.draft
    assert draft is not None
    starts: list[int] = []  # where each request's draft forward over known tokens began
    original = DraftModel._prefill

    def recording(self: DraftModel, requests: list[Request], first: list[int], ends: Optional[list[int]] = None) -> Any:
        starts.extend(first)
        return original(self, requests, first, ends)

    draft._prefill = recording.__get__(draft)  # type: ignore[method-assign]

    async def turn(store: SessionStore, sid: str, text: str) -> tuple[int, int]:
        """(the session's tokens before the turn, the first token the turn's draft computed)."""
        before = len(store.sessions[sid].token_ids)
        starts.clear()
        await run_turn(store, sid, text, GREEDY)
        return before, min(starts)

    async def body() -> None:
        store = SessionStore(aeng)
        sid = (await store.create([SYSTEM])).session_id
        assert (await turn(store, sid, "First question?"))[1] == 0
        # A turn's last tokens may lack KV (its final token is sampled, never fed; the draft trails the
        # target by the tokens of its last verification), so the draft starts a few tokens back.
        before, first = await turn(store, sid, "Second question?")
        assert before > 20 and first >= before - 3  # resident
        assert await evict(store, sid) is SessionState.SWAPPED
        before, first = await turn(store, sid, "Third, after a swap out and in?")
        assert first >= before - 3
        child = (await store.fork(sid)).session_id
        before, first = await turn(store, child, "A fork's turn.")
        assert first >= before - 3
        store.residency.num_swap_slots = 0  # no swap: the next eviction drops the pages
        assert await evict(store, child) is SessionState.EVICTED
        assert (await turn(store, child, "After the drop."))[1] == 0

    run_and_shutdown(aeng, body(), timeout=120)
    m = aeng.engine.metrics
    assert m.spec_num_draft_tokens > 0 and m.spec_num_accepted_tokens == m.spec_num_draft_tokens
