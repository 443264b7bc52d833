"""Bad bytes and non-finite numbers over gRPC are the client's error: INVALID_ARGUMENT naming what is
wrong, never UNKNOWN or INTERNAL."""

from __future__ import annotations

import math

import grpc
import pytest

from agentserve.service import agent_pb2 as pb
from conftest_grpc import make_engine, run, serving

SERVICE = pb.DESCRIPTOR.services_by_name["AgentService"]
# Truncated varint, a length prefix past the end, invalid UTF-8 in field 1 of every request that has a
# string field 1, and a wire type (7) that does not exist.
MALFORMED = [b"\xff\xff\xff", b"\x0a\x05ab", b"\x0a\x02\xff\xfe", b"\x0f"]


def test_malformed_bytes_to_every_method_are_invalid_argument() -> None:
    aeng = make_engine()

    async def main() -> dict[tuple[str, bytes], grpc.StatusCode]:
        codes: dict[tuple[str, bytes], grpc.StatusCode] = {}
        async with serving(aeng) as (handle, _client):
            async with grpc.aio.insecure_channel(handle.address) as channel:
                for method in SERVICE.methods:
                    path = f"/{SERVICE.full_name}/{method.name}"
                    for data in MALFORMED:
                        try:
                            if method.server_streaming:
                                call = channel.unary_stream(path)(data, timeout=30)
                                async for _ in call:
                                    pass
                            else:
                                await channel.unary_unary(path)(data, timeout=30)
                            codes[(method.name, data)] = grpc.StatusCode.OK
                        except grpc.aio.AioRpcError as e:
                            codes[(method.name, data)] = e.code()
                            if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                                assert method.name in e.details() and "protobuf" in e.details()
        return codes

    try:
        codes = run(main())
    finally:
        aeng.shutdown()
    assert len(codes) == len(SERVICE.methods) * len(MALFORMED)
    # Invalid UTF-8 in field 1 only fails where field 1 is a string (HealthRequest has no fields, so
    # those bytes are an unknown field there, which proto3 keeps and ignores).
    bad = {k: v for k, v in codes.items() if v in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)}
    assert not bad, bad
    for data in (b"\xff\xff\xff", b"\x0a\x05ab", b"\x0f"):
        for method in SERVICE.methods:
            assert codes[(method.name, data)] == grpc.StatusCode.INVALID_ARGUMENT, (method.name, data)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_session_numbers_are_refused(value: float) -> None:
    aeng = make_engine()

    async def main() -> None:
        async with serving(aeng) as (_handle, client):
            stub = client.stub
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.CreateSession(pb.CreateSessionRequest(ttl_seconds=value))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "ttl_seconds" in err.value.details()
            info = await stub.CreateSession(pb.CreateSessionRequest(
                messages=[pb.Message(role="user", content="hi")]))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.ForkSession(pb.ForkSessionRequest(session_id=info.session_id, ttl_seconds=value))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "ttl_seconds" in err.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in stub.Turn(pb.TurnRequest(session_id=info.session_id, expected_next_turn_ms=value,
                                                        sampling=pb.SamplingParams(max_tokens=2))):
                    pass
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "expected_next_turn_ms" in err.value.details()
            # The refused turn left the session usable.
            events = [ev async for ev in stub.Turn(pb.TurnRequest(
                session_id=info.session_id, sampling=pb.SamplingParams(max_tokens=2, temperature=0)))]
            assert events[-1].HasField("done")
            await stub.CloseSession(pb.CloseSessionRequest(session_id=info.session_id))

    try:
        run(main())
    finally:
        aeng.shutdown()
