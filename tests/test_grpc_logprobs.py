"""Output logprobs over gRPC (SamplingParams.logprobs) with the real client and server on a tiny CPU
model: every generated token's entry comes once, in order, in the text deltas of Generate and Turn
(tokens that add no text, such as a tool call's, in deltas with empty text), with the numbers the
offline LLM gives for the same prompt on a separate engine; bad counts are INVALID_ARGUMENT naming the
field."""

from __future__ import annotations

import math
from typing import Any

import grpc
import pytest

from agentserve.adapters.client import AgentClient
from agentserve.sampling_params import SamplingParams
from agentserve.service import agent_pb2 as pb
from conftest_grpc import SYSTEM, TOOLS, USER, make_engine, reference_llm, rpc_status, run_with_client

TOP = 3


@pytest.fixture(scope="module")
def aeng():  # type: ignore[no-untyped-def]
    engine = make_engine("qwen2", max_logprobs=5)
    yield engine
    engine.shutdown()


def streamed(events: list[Any]) -> list[pb.PositionLogprobs]:
    """The logprob entries of the text and reasoning deltas, in stream order."""
    out = []
    for ev in events:
        kind = ev.WhichOneof("event")
        if kind in ("text", "reasoning"):
            out.extend(getattr(ev, kind).logprobs)
    return out


def assert_matches_reference(entries: list[pb.PositionLogprobs], prompt_ids: list[int], max_tokens: int,
                             **sampling: Any) -> None:
    """Same tokens, logprobs and alternatives as the offline LLM on the same prompt (greedy)."""
    ref = reference_llm("qwen2").generate([prompt_ids], SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                                        logprobs=TOP, **sampling))[0].outputs[0]
    assert ref.logprobs is not None
    assert [e.sampled.token_id for e in entries] == list(ref.token_ids)
    for entry, tid, position in zip(entries, ref.token_ids, ref.logprobs):
        assert math.isclose(entry.sampled.logprob, position[tid].logprob, rel_tol=1e-5, abs_tol=1e-5)
        assert entry.sampled.token == position[tid].decoded_token and entry.sampled.rank == position[tid].rank
        want_top = sorted((lp.rank, t) for t, lp in position.items() if 1 <= lp.rank <= TOP)
        assert [(e.rank, e.token_id) for e in entry.top] == want_top
        # Greedy: the sampled token is the most likely one, and the alternatives come most likely first.
        assert entry.top[0].token_id == tid and entry.sampled.rank == 1
        assert all(a.logprob >= b.logprob for a, b in zip(entry.top, entry.top[1:]))


def test_generate_streams_each_tokens_logprobs(aeng) -> None:  # type: ignore[no-untyped-def]
    async def body(client: AgentClient) -> None:
        prompt = [5, 17, 42, 99, 7]
        events = [ev async for ev in client.generate(prompt_token_ids=prompt, max_tokens=10, temperature=0.0,
                                                      logprobs=TOP)]
        entries = streamed(events)
        assert len(entries) == len(events[-1].done.token_ids) == 10
        assert_matches_reference(entries, prompt, 10)
        # Not asked: none.
        plain = [ev async for ev in client.generate(prompt_token_ids=prompt, max_tokens=4, temperature=0.0)]
        assert streamed(plain) == []
        # logprobs 0: the sampled token's alone.
        zero = streamed([ev async for ev in client.generate(prompt_token_ids=prompt, max_tokens=4, temperature=0.0,
                                                             logprobs=0)])
        assert len(zero) == 4 and all(not e.top and e.sampled.token_id >= 0 for e in zero)

    run_with_client(aeng, body)


def test_turn_logprobs_match_a_stateless_generation(aeng) -> None:  # type: ignore[no-untyped-def]
    async def body(client: AgentClient) -> None:
        session = await client.create_session([SYSTEM])
        first = await session.run_turn(USER, max_tokens=8, temperature=0.0, logprobs=TOP, return_token_ids=True)
        entries = streamed(first.events)
        assert [e.sampled.token_id for e in entries] == list(first.done.token_ids)
        assert_matches_reference(entries, list(first.done.prompt_token_ids), 8)
        # The next turn runs on the session's pages; its entries are its own tokens'.
        second = await session.run_turn([{"role": "user", "content": "And then?"}], max_tokens=6, temperature=0.0,
                                        logprobs=TOP, return_token_ids=True)
        assert second.done.usage.cached_tokens > 0
        assert_matches_reference(streamed(second.events), list(second.done.prompt_token_ids), 6)

    run_with_client(aeng, body)


def test_a_tool_calls_tokens_come_in_deltas_with_empty_text(aeng) -> None:  # type: ignore[no-untyped-def]
    async def body(client: AgentClient) -> None:
        session = await client.create_session([SYSTEM], tools=TOOLS)
        out = await session.run_turn(USER, max_tokens=40, temperature=0.0, tool_choice="required", logprobs=1,
                                     return_token_ids=True)
        assert out.done.finish_reason in ("tool_calls", "length") and out.done.message.tool_calls
        assert [e.sampled.token_id for e in streamed(out.events)] == list(out.done.token_ids)
        silent = [ev.text for ev in out.events if ev.WhichOneof("event") == "text" and not ev.text.text]
        assert silent and all(d.logprobs for d in silent)  # the call's tokens: no text, their logprobs

    run_with_client(aeng, body)


def test_bad_counts_are_invalid_argument(aeng) -> None:  # type: ignore[no-untyped-def]
    async def body(client: AgentClient) -> None:
        for count in (-1, 6):  # the server's --max-logprobs is 5
            code, details = await rpc_status(client.generate_done(prompt_token_ids=[1, 2, 3], max_tokens=2,
                                                                  logprobs=count))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "logprobs" in details, (count, details)
            session = await client.create_session([SYSTEM])
            code, details = await rpc_status(session.run_turn(USER, max_tokens=2, logprobs=count))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "logprobs" in details, (count, details)

    run_with_client(aeng, body)

