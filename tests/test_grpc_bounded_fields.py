"""Request fields whose cost grows with their size are bounded over gRPC: sampling.bad_words (each
word is tokenized on the step thread and matched at every step, so a long list stalled every other
request) and session metadata (echoed in every SessionInfo, so a large map made a session whose own
reply the client could not receive). Past a limit: INVALID_ARGUMENT naming the field, nothing
created, and the next request is served as usual."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from agentserve.chat.limits import MAX_METADATA_KEY_CHARS, MAX_METADATA_PAIRS, MAX_METADATA_VALUE_CHARS
from agentserve.engine.async_engine import AsyncEngine
from agentserve.service import agent_pb2 as pb
from agentserve.service import agent_pb2_grpc as pb_grpc
from conftest_grpc import make_engine, run, serving

Code = grpc.StatusCode


@pytest.fixture(scope="module")
def aeng() -> AsyncEngine:
    engine = make_engine(num_blocks=128, max_bad_words=3, max_bad_word_chars=8)
    yield engine
    engine.shutdown()


async def _generate(stub: pb_grpc.AgentServiceStub, **sampling: Any) -> tuple[Code, str]:
    try:
        async for _ in stub.Generate(pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(
                max_tokens=2, **sampling)), timeout=30):
            pass
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details() or ""
    return Code.OK, ""


async def _turn(stub: pb_grpc.AgentServiceStub, session_id: str, **sampling: Any) -> tuple[Code, str]:
    try:
        async for _ in stub.Turn(pb.TurnRequest(session_id=session_id, messages=[pb.Message(role="user", content="hi")],
                                                sampling=pb.SamplingParams(max_tokens=2, **sampling)), timeout=30):
            pass
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details() or ""
    return Code.OK, ""


def test_bad_words_over_the_limits_are_invalid_argument(aeng: AsyncEngine) -> None:
    async def body() -> None:
        async with serving(aeng, with_client=False) as (handle, _client):
            async with grpc.aio.insecure_channel(handle.address) as channel:
                stub = pb_grpc.AgentServiceStub(channel)
                code, msg = await _generate(stub, bad_words=["a", "b", "c", "d"])
                assert code == Code.INVALID_ARGUMENT and "sampling.bad_words has 4" in msg and "--max-bad-words" in msg
                code, msg = await _generate(stub, bad_words=["ok", "x" * 9])
                assert code == Code.INVALID_ARGUMENT and "sampling.bad_words[1]" in msg and "--max-bad-word-chars" in msg
                assert await _generate(stub, bad_words=["a", "b", "x" * 8]) == (Code.OK, "")

                session = await stub.CreateSession(pb.CreateSessionRequest())
                code, msg = await _turn(stub, session.session_id, bad_words=["a", "b", "c", "d"])
                assert code == Code.INVALID_ARGUMENT and "sampling.bad_words" in msg
                assert (await stub.GetSession(pb.GetSessionRequest(session_id=session.session_id))).num_turns == 0
                assert await _turn(stub, session.session_id, bad_words=["a"]) == (Code.OK, "")
                await stub.CloseSession(pb.CloseSessionRequest(session_id=session.session_id))
        assert not aeng.engine.requests and aeng.engine.pool.num_used_blocks == 0

    run(body())


@pytest.mark.parametrize("metadata, named", [
    ({f"k{i}": "v" for i in range(MAX_METADATA_PAIRS + 1)}, f"metadata has {MAX_METADATA_PAIRS + 1} pairs"),
    ({"k" * (MAX_METADATA_KEY_CHARS + 1): "v"}, "metadata key"),
    ({"k": "v" * (MAX_METADATA_VALUE_CHARS + 1)}, "metadata['k']"),
])
def test_session_metadata_over_the_limits_is_invalid_argument(aeng: AsyncEngine, metadata: dict[str, str],
                                                              named: str) -> None:
    async def body() -> None:
        async with serving(aeng, with_client=False) as (handle, _client):
            async with grpc.aio.insecure_channel(handle.address) as channel:
                stub = pb_grpc.AgentServiceStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.CreateSession(pb.CreateSessionRequest(metadata=metadata), timeout=30)
                assert err.value.code() == Code.INVALID_ARGUMENT and named in (err.value.details() or "")
                assert not (await stub.ListSessions(pb.ListSessionsRequest())).sessions

                most = {f"k{i}": "v" * MAX_METADATA_VALUE_CHARS for i in range(MAX_METADATA_PAIRS)}
                parent = await stub.CreateSession(pb.CreateSessionRequest(metadata=most))
                assert dict(parent.metadata) == most
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.ForkSession(pb.ForkSessionRequest(session_id=parent.session_id, metadata=metadata))
                assert err.value.code() == Code.INVALID_ARGUMENT and named in (err.value.details() or "")
                listed = (await stub.ListSessions(pb.ListSessionsRequest())).sessions
                assert [s.session_id for s in listed] == [parent.session_id]
                await stub.CloseSession(pb.CloseSessionRequest(session_id=parent.session_id))

    run(body())


def test_repeated_token_ids_are_kept_once(aeng: AsyncEngine) -> None:
    """stop_token_ids is searched for every generated token and allowed_token_ids turned into a mask at
    every step, on the step thread: a request repeating ids must cost no more there than one naming each id
    once. (More entries than the vocabulary are refused by their length at the edge: a million repeats held
    the event loop while the list was copied and checked.)"""
    async def body() -> None:
        async with serving(aeng, with_client=False) as (handle, _client):
            async with grpc.aio.insecure_channel(handle.address) as channel:
                stub = pb_grpc.AgentServiceStub(channel)
                call = stub.Generate(pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(
                    max_tokens=200, ignore_eos=True, stop_token_ids=[7, 9] * 300,
                    allowed_token_ids=[3, 5, 7] * 300)), timeout=60)
                events = call.__aiter__()
                await events.__anext__()  # the request is in the engine now
                params = [r.sampling_params for r in list(aeng.engine.requests.values())]
                assert [(p.stop_token_ids, p.allowed_token_ids) for p in params] == [([7, 9], [3, 5, 7])]
                call.cancel()
                for _ in range(500):  # the server aborts the request once it sees the cancellation
                    if not aeng.engine.requests:
                        break
                    await asyncio.sleep(0.01)
        assert not aeng.engine.requests and aeng.engine.pool.num_used_blocks == 0

    run(body())
