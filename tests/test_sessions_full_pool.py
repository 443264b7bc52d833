"""A session whose next turn needs every page of the pool (tiny qwen2, CPU, gRPC).

A turn's request takes copy-on-write references to its session's pages, so writing into the session's
partial last page takes a copy: one page beyond the turn's own tokens. With a pool exactly the turn's
size and nothing else to evict, that page never came free and the turn waited in the queue for ever
(the step loop spinning; found by tests/test_soak.py's n-gram variant). The asking session now gives
the partial page to its turn (sessions/residency.py, _give_tail_to_turn): the turn runs, its reply
is the one a roomy pool gives, and a cancelled turn leaves a session whose next turn is still exact.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from conftest_grpc import SYSTEM, make_engine, run_and_shutdown, serving

BS = 16
FIRST = [{"role": "user", "content": "List three colours."}]
SECOND = [{"role": "user", "content": "Now three animals, please."}]
ANSWER_TOKENS = 4  # below decode_reserve_tokens: the turn's pages are its prompt and these


@dataclass
class Shape:
    first_max_tokens: int  # the first turn's length: the session then ends inside a page
    history_tokens: int    # the session's KV after the first turn
    second_prompt: int     # the second turn's prompt tokens
    second_reply: list[int]


def greedy(max_tokens: int) -> dict[str, Any]:
    return dict(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, return_token_ids=True)


async def _first_turn(client: Any, first_max_tokens: int) -> tuple[Any, int]:
    """A new session after its first turn, and the tokens of KV it then holds."""
    session = await client.create_session([SYSTEM])
    first = await session.run_turn(FIRST, **greedy(first_max_tokens))
    return session, first.done.session.num_kv_tokens


def _probe() -> Shape:
    """In a roomy pool: a first-turn length after which the session's KV ends inside a page, the second
    turn's prompt length and its reply."""
    aeng = make_engine(num_blocks=256, max_model_len=1024)
    found: list[Shape] = []

    async def body() -> None:
        async with serving(aeng) as (_, client):
            for n in range(5, 5 + BS):
                session, history = await _first_turn(client, n)
                if history % BS:
                    second = await session.run_turn(SECOND, **greedy(ANSWER_TOKENS))
                    found.append(Shape(n, history, second.done.usage.prompt_tokens, list(second.done.token_ids)))
                    return
                await session.close()

    run_and_shutdown(aeng, body())
    assert found, "no first-turn length left the session inside a page"
    return found[0]


def test_a_turn_that_needs_the_whole_pool_runs_and_a_cancelled_one_leaves_the_session_exact() -> None:
    shape = _probe()
    pages = -(-(shape.second_prompt + ANSWER_TOKENS) // BS)  # the second turn's pages: the whole pool
    assert -(-shape.history_tokens // BS) < pages
    aeng = make_engine(num_blocks=pages, max_model_len=pages * BS)

    async def body() -> None:
        async with serving(aeng) as (handle, client):
            # Cancelled first: the session gives its partial page to the turn; after the cancel it
            # holds its full pages only, and the next turn recomputes the rest.
            session, history = await _first_turn(client, shape.first_max_tokens)
            assert history == shape.history_tokens
            async for _ in session.turn(SECOND, **greedy(ANSWER_TOKENS)):
                break
            for _ in range(100):
                if not (await session.refresh()).busy:
                    break
                await asyncio.sleep(0.05)
            assert session.info.num_kv_tokens == history // BS * BS  # the partial page went with the turn
            second = await asyncio.wait_for(session.run_turn(SECOND, **greedy(ANSWER_TOKENS)), 60)
            assert list(second.done.token_ids) == shape.second_reply
            assert second.done.usage.prompt_tokens == shape.second_prompt
            await session.close()
            # Then straight through, on a fresh session.
            session, _ = await _first_turn(client, shape.first_max_tokens)
            second = await asyncio.wait_for(session.run_turn(SECOND, **greedy(ANSWER_TOKENS)), 60)
            assert list(second.done.token_ids) == shape.second_reply
            await session.close()
            pool = handle.engine.pool
            assert pool.num_free_blocks == pool.num_blocks

    run_and_shutdown(aeng, body(), timeout=180)
