"""INVALID_ARGUMENT messages tell a gRPC client what to fix in the RPC it actually sent."""

from __future__ import annotations

import grpc
import pytest

from agentserve.service import agent_pb2 as pb
from agentserve.service import agent_pb2_grpc as pb_grpc
from conftest_grpc import make_engine, run, serving


async def _generate_error(stub: pb_grpc.AgentServiceStub, request: pb.GenerateRequest) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in stub.Generate(request, timeout=30):
            pass
    return err.value


def test_generate_messages_name_the_fix() -> None:
    aeng = make_engine(num_blocks=64)

    async def body() -> None:
        async with serving(aeng) as (handle, _client):
            async with grpc.aio.insecure_channel(handle.address) as channel:
                stub = pb_grpc.AgentServiceStub(channel)
                err = await _generate_error(stub, pb.GenerateRequest(
                    messages=[pb.Message(role="user", content="hi")], tool_choice="required",
                    sampling=pb.SamplingParams(max_tokens=2)))
                # Generate has no session: the fix is its own tools field.
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "tool_choice" in (err.details() or "") and "GenerateRequest.tools" in (err.details() or "")

                err = await _generate_error(stub, pb.GenerateRequest(prompt="", sampling=pb.SamplingParams(max_tokens=2)))
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompt is empty" in (err.details() or "")
                err = await _generate_error(stub, pb.GenerateRequest(prompt="hi", prompt_token_ids=[1]))
                assert "not 2" in (err.details() or "")
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "exactly one of" in (err.details() or "")

                session = await stub.CreateSession(pb.CreateSessionRequest())
                with pytest.raises(grpc.aio.AioRpcError) as turn_err:
                    async for _ in stub.Turn(pb.TurnRequest(session_id=session.session_id, tool_choice="auto",
                                                            messages=[pb.Message(role="user", content="hi")])):
                        pass
                assert turn_err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "CreateSessionRequest.tools" in (turn_err.value.details() or "")
                await stub.CloseSession(pb.CloseSessionRequest(session_id=session.session_id))

    try:
        run(body())
    finally:
        aeng.shutdown()


def test_a_turn_past_max_model_len_names_the_session_history() -> None:
    aeng = make_engine(num_blocks=128, max_model_len=64)

    async def body() -> None:
        async with serving(aeng) as (handle, _client):
            async with grpc.aio.insecure_channel(handle.address) as channel:
                stub = pb_grpc.AgentServiceStub(channel)
                session = await stub.CreateSession(pb.CreateSessionRequest(
                    raw_tokens=True, messages=[pb.Message(role="user", token_ids=[5] * 60)]))
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    async for _ in stub.Turn(pb.TurnRequest(session_id=session.session_id, messages=[
                            pb.Message(role="user", token_ids=[6] * 4)])):
                        pass
                details = err.value.details() or ""
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "history (60 tokens)" in details and "64 tokens" in details and "new session" in details
                # Nothing changed: a turn that fits still runs.
                info = await stub.GetSession(pb.GetSessionRequest(session_id=session.session_id))
                assert (info.num_tokens, info.num_turns) == (60, 0)
                async for _ in stub.Turn(pb.TurnRequest(session_id=session.session_id, sampling=pb.SamplingParams(
                        max_tokens=2), messages=[pb.Message(role="user", token_ids=[6])])):
                    pass
                await stub.CloseSession(pb.CloseSessionRequest(session_id=session.session_id))

    try:
        run(body())
    finally:
        aeng.shutdown()


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_priority_needs_the_priority_policy(policy: str) -> None:
    """A priority the fcfs scheduler would ignore is refused naming the field (vLLM's rule, as the HTTP API
    and the offline LLM do); under the priority policy the same RPCs run."""
    aeng = make_engine(num_blocks=64, policy=policy)

    async def body() -> None:
        async with serving(aeng) as (handle, _client):
            async with grpc.aio.insecure_channel(handle.address) as channel:
                stub = pb_grpc.AgentServiceStub(channel)
                generate = pb.GenerateRequest(prompt="hi", priority=3, sampling=pb.SamplingParams(max_tokens=2))
                session = await stub.CreateSession(pb.CreateSessionRequest())
                turn = pb.TurnRequest(session_id=session.session_id, priority=-1, sampling=pb.SamplingParams(
                    max_tokens=2), messages=[pb.Message(role="user", content="hi")])
                if policy == "fcfs":
                    err = await _generate_error(stub, generate)
                    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
                    assert "priority is 3" in (err.details() or "") and "--scheduling-policy priority" in (err.details() or "")
                    with pytest.raises(grpc.aio.AioRpcError) as turn_err:
                        async for _ in stub.Turn(turn):
                            pass
                    assert turn_err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                    assert "priority is -1" in (turn_err.value.details() or "")
                    info = await stub.GetSession(pb.GetSessionRequest(session_id=session.session_id))
                    assert (info.num_turns, info.busy) == (0, False)  # nothing ran, the session is free
                    generate.priority = turn.priority = 0
                done = [e async for e in stub.Generate(generate)][-1]
                assert done.done.usage.completion_tokens == 2
                events = [e async for e in stub.Turn(turn)]
                assert events[-1].done.usage.completion_tokens == 2
                await stub.CloseSession(pb.CloseSessionRequest(session_id=session.session_id))

    try:
        run(body())
    finally:
        aeng.shutdown()
