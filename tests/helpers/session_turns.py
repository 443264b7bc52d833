"""Session turns driven through the store (sessions/store.py) on a test's own asyncio loop, and the
stateless references they must equal: a plain generate over each turn's whole prompt on a separate
engine of the same config (so a reference can never reuse a session's pages by hash)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from agentserve.llm import LLM
from agentserve.sampling_params import SamplingParams
from agentserve.sessions.store import SessionStore
from agentserve.sessions.types import SessionState, TurnResult


@dataclass
class Turn:
    """One finished turn and what the reference needs to replay it statelessly."""
    adapter: Optional[str]
    params: SamplingParams
    result: TurnResult

    @property
    def prompt(self) -> list[int]:
        return self.result.prompt_token_ids

    @property
    def token_ids(self) -> list[int]:
        return self.result.token_ids


async def run_turn(store: SessionStore, session_id: str, text: str, params: SamplingParams,
                   role: str = "user") -> Turn:
    """One turn to its end; the session's adapter is recorded for the reference."""
    result: Optional[TurnResult] = None
    async for event in store.turn(session_id, [{"role": role, "content": text}], params):
        if isinstance(event, TurnResult):
            result = event
    assert result is not None
    return Turn(result.session.adapter, params, result)


async def evict(store: SessionStore, session_id: str) -> SessionState:
    """Evicts an idle session now (swap if there is room, else drop); returns its new state."""
    def on_step_thread() -> SessionState:
        s = store.sessions[session_id]
        store.residency.evict(s)
        return s.state

    return await store.aeng.run(on_step_thread)


def stateless(llm: LLM, turns: Sequence[Turn]) -> list[list[int]]:
    """Each turn's tokens from a stateless generate over its whole prompt, with its adapter and params."""
    outs = []
    for t in turns:
        out = llm.generate([list(t.prompt)], t.params, adapter=t.adapter)
        outs.append(list(out[0].outputs[0].token_ids))
    return outs


def assert_exact(llm: LLM, turns: Sequence[Turn]) -> None:
    expected = stateless(llm, turns)
    got = [list(t.token_ids) for t in turns]
    for i, (e, g) in enumerate(zip(expected, got)):
        assert g == e, f"turn {i} (adapter {turns[i].adapter!r}): session {g} != stateless {e}"


async def assert_clean(store: SessionStore) -> None:
    """Every session closed: every page and swap slot free, no request left."""
    await store.close_all()

    def check() -> Any:
        engine = store.engine
        assert not engine.has_unfinished()
        engine.pool.check_all_free()
        assert store.num_free_swap_slots == store.num_swap_slots
        assert not store._pending

    await store.aeng.run(check)
