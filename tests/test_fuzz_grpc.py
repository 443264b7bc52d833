"""A bounded, seeded fuzz of every AgentService method: messages with random and garbled field
values (built from the .proto's descriptors, with plausible values mixed in so that requests get
past the first check: real session ids, roles, constraint kinds, schemas) and raw malformed bytes
(random bytes, truncated and bit-flipped serializations). No reply may be INTERNAL, UNKNOWN or
DATA_LOSS. Counts per method and the status histogram go to the test output (`-s`)."""

from __future__ import annotations

import collections
import math
import random
import time
from typing import Any

import grpc
from google.protobuf import descriptor as D
from google.protobuf.message import Message

from agentserve.service import agent_pb2 as pb
from conftest_grpc import make_engine, run, serving

SEED = 20261202
CALLS_PER_METHOD = 200        # random messages per method
MALFORMED_PER_METHOD = 50    # raw byte strings per method
CALL_TIMEOUT_S = 30.0
SERVICE = pb.DESCRIPTOR.services_by_name["AgentService"]
SERVER_FAULTS = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS}

INTS = [0, 1, -1, 2, 7, 16, 2**31 - 1, -2**31]
FLOATS = [0.0, 1.0, -1.0, 0.5, 1e-9, 1e308, -1e308, math.nan, math.inf, -math.inf]
STRINGS = ["", "a", "hi there", "\x00", "\u202e", "é" * 50, "{", "[]", "null", "x" * 5000, "\U0001F600"]
SCHEMAS = ['{"type": "object", "properties": {"a": {"type": "integer"}}}', '{"$ref": "#"}', "{", "[]",
           '{"type": "string", "pattern": "^d{1000000}$"}', '{"type": "integer", "minimum": 5, "maximum": 1}']
# Plausible values by field name: a request that fails its first check tests little.
BY_NAME: dict[str, list[Any]] = {
    "role": ["user", "system", "assistant", "tool", "developer", "robot", ""],
    "type": ["text", "json_object", "json_schema", "regex", "choice", "xml", ""],
    "json_schema": SCHEMAS,
    "parameters_json": SCHEMAS,
    "regex": ["[a-z]{1,5}", "(", "a{1000000}", "", ".*"],
    "tool_choice": ["", "auto", "none", "required", "f", "missing"],
    "model": ["", "", "", "other"],
    "adapter": ["", "", "", "lora-x"],
    "max_tokens": [1, 2, 4, 0, -1, 2**31 - 1],
    "min_tokens": [0, 1, 3, -1, 2**31 - 1],
    "token_ids": [[1, 2, 3], [-1], [2**31 - 1], []],
    "prompt_token_ids": [[1, 2, 3], [-5], [2**31 - 1], [0] * 2000],
    "stop_token_ids": [[1], [-1], [2**31 - 1]],
    "name": ["f", "", "get weather", "x" * 300],
}


def _scalar(field: D.FieldDescriptor, rng: random.Random) -> Any:
    t = field.type
    if t in (D.FieldDescriptor.TYPE_DOUBLE, D.FieldDescriptor.TYPE_FLOAT):
        return rng.choice(FLOATS)
    if t == D.FieldDescriptor.TYPE_BOOL:
        return rng.random() < 0.5
    if t == D.FieldDescriptor.TYPE_STRING:
        return rng.choice(STRINGS)
    if t == D.FieldDescriptor.TYPE_BYTES:
        return rng.randbytes(rng.randrange(8))
    if t == D.FieldDescriptor.TYPE_ENUM:
        return rng.choice([v.number for v in field.enum_type.values])
    if t in (D.FieldDescriptor.TYPE_INT64, D.FieldDescriptor.TYPE_SINT64, D.FieldDescriptor.TYPE_SFIXED64):
        return rng.choice(INTS + [2**63 - 1, -2**63])
    if t in (D.FieldDescriptor.TYPE_UINT32, D.FieldDescriptor.TYPE_FIXED32):
        return rng.choice([0, 1, 2**32 - 1])
    if t in (D.FieldDescriptor.TYPE_UINT64, D.FieldDescriptor.TYPE_FIXED64):
        return rng.choice([0, 1, 2**64 - 1])
    return rng.choice(INTS)


def valid_request(method: str, session_id: str) -> Message:
    """A request of `method` that succeeds, the base of the mutation half of the fuzz."""
    sampling = pb.SamplingParams(max_tokens=3, temperature=0)
    user = [pb.Message(role="user", content="hi")]
    if method == "Turn":
        return pb.TurnRequest(session_id=session_id, messages=user, sampling=sampling)
    if method == "Generate":
        return pb.GenerateRequest(prompt="hello", sampling=sampling)
    if method == "CreateSession":
        return pb.CreateSessionRequest(messages=user)
    request_class = getattr(pb, SERVICE.methods_by_name[method].input_type.name)
    if "session_id" in request_class.DESCRIPTOR.fields_by_name:
        return request_class(session_id=session_id)
    return request_class()


def fill(msg: Message, rng: random.Random, session_ids: list[str], depth: int = 0, skip: float = 0.6) -> Message:
    """Sets random fields of `msg` (each left unset with probability `skip`, less below the top)."""
    for field in msg.DESCRIPTOR.fields:
        if rng.random() < (skip if depth == 0 else skip / 2) and field.name != "session_id":
            continue  # left unset (often: Generate wants exactly one of its prompt fields)
        name = field.name
        if name in ("session_id", "parent_id") and field.type == D.FieldDescriptor.TYPE_STRING:
            setattr(msg, name, rng.choice(session_ids * 4 + ["", "no-such-session"]))
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            target = getattr(msg, name)
            entry = field.message_type.fields_by_name
            for _ in range(rng.randrange(3)):  # string maps (metadata) and number maps (logit_bias) alike
                target[_scalar(entry["key"], rng)] = _scalar(entry["value"], rng)
            continue
        if field.message_type is not None:
            if depth >= 3:
                continue
            if field.is_repeated:
                for _ in range(rng.randrange(4)):
                    fill(getattr(msg, name).add(), rng, session_ids, depth + 1, skip)
            else:
                fill(getattr(msg, name), rng, session_ids, depth + 1, skip)
            continue
        plausible = BY_NAME.get(name)
        if field.is_repeated:
            if plausible is not None and isinstance(plausible[0], list) and rng.random() < 0.7:
                getattr(msg, name).extend(rng.choice(plausible))
            else:
                getattr(msg, name).extend(_scalar(field, rng) for _ in range(rng.randrange(4)))
            continue
        if plausible is not None and not isinstance(plausible[0], list) and rng.random() < 0.7:
            setattr(msg, name, rng.choice(plausible))
        else:
            setattr(msg, name, _scalar(field, rng))
    return msg


def garble(valid: bytes, rng: random.Random) -> bytes:
    kind = rng.randrange(4)
    if kind == 0 or not valid:
        return rng.randbytes(rng.randrange(1, 64))
    if kind == 1:
        return valid[:rng.randrange(len(valid))] + b"\xff"  # truncated, then a dangling varint byte
    data = bytearray(valid)
    for _ in range(rng.randrange(1, 4)):
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    if kind == 2:
        return bytes(data)
    return bytes(data) + bytes([rng.randrange(256) for _ in range(rng.randrange(1, 8))])


def test_grpc_fuzz_every_method_has_no_server_faults() -> None:
    rng = random.Random(SEED)
    aeng = make_engine(max_model_len=96)
    sent: collections.Counter[str] = collections.Counter()
    codes: collections.Counter[str] = collections.Counter()
    by_method: collections.Counter[tuple[str, str]] = collections.Counter()
    faults: list[str] = []

    async def call(channel: grpc.aio.Channel, method: D.MethodDescriptor, data: bytes) -> grpc.StatusCode:
        path = f"/{SERVICE.full_name}/{method.name}"
        try:
            if method.server_streaming:
                async for _ in channel.unary_stream(path)(data, timeout=CALL_TIMEOUT_S):
                    pass
            else:
                await channel.unary_unary(path)(data, timeout=CALL_TIMEOUT_S)
            return grpc.StatusCode.OK
        except grpc.aio.AioRpcError as e:
            if e.code() in SERVER_FAULTS:
                faults.append(f"{method.name}: {e.code().name}: {e.details()[:300]} <- {data[:200]!r}")
            return e.code()

    async def main() -> float:
        started = time.monotonic()
        async with serving(aeng) as (handle, client):
            async with grpc.aio.insecure_channel(handle.address) as channel:
                # Methods interleaved, so that session methods find open sessions (the fuzz closes
                # some); a few real sessions are kept open throughout.
                plan = [(m, i) for m in SERVICE.methods for i in range(CALLS_PER_METHOD + MALFORMED_PER_METHOD)]
                rng.shuffle(plan)
                session_ids: list[str] = []
                for n, (method, i) in enumerate(plan):
                    if n % 20 == 0:
                        session_ids = [s.session_id for s in await client.list_sessions()][-6:]
                        while len(session_ids) < 3:
                            created = await client.create_session([{"role": "system", "content": "agent"}])
                            session_ids.append(created.info.session_id)
                    request_class = getattr(pb, method.input_type.name)
                    if i % 2:  # one or two fields of a request that would succeed, mutated
                        request = valid_request(method.name, rng.choice(session_ids))
                        request.MergeFrom(fill(request_class(), rng, session_ids, skip=0.9))
                    else:
                        request = fill(request_class(), rng, session_ids)
                    valid = request.SerializeToString()
                    data = valid if i < CALLS_PER_METHOD else garble(valid, rng)
                    code = await call(channel, method, data)
                    sent[method.name] += 1
                    codes[code.name] += 1
                    by_method[(method.name, code.name)] += 1
            async for s in client.iter_sessions():  # close what the fuzz left open (forks too), page by page
                try:
                    await client.stub.CloseSession(pb.CloseSessionRequest(session_id=s.session_id))
                except grpc.aio.AioRpcError as e:  # the fuzz gave some sessions a TTL of ~0 s
                    assert e.code() == grpc.StatusCode.NOT_FOUND, e
        return time.monotonic() - started

    try:
        elapsed = run(main(), timeout=300)
    finally:
        aeng.shutdown()
    print(f"\ngRPC fuzz (seed {SEED}): {sum(sent.values())} calls in {elapsed:.1f} s; per method "
          f"{dict(sorted(sent.items()))}; status codes {dict(sorted(codes.items()))}")
    print("per method and code:", dict(sorted(by_method.items())))
    assert set(sent) == {m.name for m in SERVICE.methods}
    assert all(n == CALLS_PER_METHOD + MALFORMED_PER_METHOD for n in sent.values())
    assert codes["INVALID_ARGUMENT"] > 0 and codes["OK"] > 0
    assert not faults, "\n".join(faults[:15])
