"""Bounded work at the edge (issue #10): huge requests are refused without stalling other streams or
buffering their bodies; per-request limits; client chat templates; lone surrogates; the render pool
does not queue a small request behind a large one."""

from __future__ import annotations

import asyncio
import gc
import json
import threading
import time
from typing import Any, Optional

import grpc
import httpx
import psutil
import pytest

from agentserve.chat.render_pool import RenderPool
from agentserve.config import ServerConfig
from agentserve.engine.async_engine import AsyncEngine
from agentserve.service import agent_pb2 as pb
from conftest_grpc import make_engine, run, serving

BIG = 50 * 2**20  # 50 MB
Code = grpc.StatusCode


@pytest.fixture(scope="module")
def aeng() -> AsyncEngine:
    # Default limits (32 MiB bodies and gRPC messages); max_model_len 1024 -> 32 KiB character bound.
    engine = make_engine(max_model_len=1024, num_blocks=256)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def strict() -> AsyncEngine:
    engine = make_engine(max_model_len=1024, num_blocks=128, max_messages=4, max_tools=2, max_stop_strings=3,
                         max_stop_string_chars=16, max_bad_words=3, max_bad_word_chars=16, max_schema_depth=6, max_schema_bytes=2048)
    yield engine
    engine.shutdown()


async def _chunked_post(port: int, path: str, total: int) -> tuple[int, int]:
    """POSTs `total` bytes with Transfer-Encoding: chunked, generated as it goes (the client holds one
    64 KiB chunk); returns (HTTP status, bytes sent before the answer came)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 "Transfer-Encoding: chunked\r\n\r\n".encode())
    chunk = b'{"prompt": "' + b"a" * (64 * 1024 - 12)
    sent = 0
    status_line: Optional[bytes] = None
    read = asyncio.ensure_future(reader.readline())
    try:
        while sent < total:
            if read.done():
                status_line = read.result()
                break
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent += len(chunk)
            try:
                await writer.drain()
            except ConnectionError:
                break
            chunk = b"a" * (64 * 1024)
        if status_line is None:
            status_line = await asyncio.wait_for(read, 30)
    finally:
        writer.close()
    return int(status_line.split()[1]), sent


def _raw_rpc(client: Any, method: str, response_type: Any, streams: bool = False) -> Any:
    """A stub of one AgentService method that sends bytes serialized beforehand (built outside the timed part)."""
    make = client.channel.unary_stream if streams else client.channel.unary_unary
    return make(f"/agentserve.v1.AgentService/{method}", request_serializer=lambda b: b,
                response_deserializer=response_type.FromString)


async def _stream_gaps(client: Any, gaps: list[float], max_tokens: int) -> None:
    """A small stream beside the hostile requests: the time between its events goes to `gaps`."""
    last = time.monotonic()
    async for _ in client.generate(prompt_token_ids=[5, 6, 7], max_tokens=max_tokens, ignore_eos=True,
                                   temperature=0.0):
        now = time.monotonic()
        gaps.append(now - last)
        last = now


def _rss() -> int:
    return psutil.Process().memory_info().rss


def test_huge_requests_refused_without_stalling_streams(aeng: AsyncEngine) -> None:
    big_session = pb.CreateSessionRequest(messages=[pb.Message(role="user", content="x" * BIG)]).SerializeToString()
    mid_session = pb.CreateSessionRequest(messages=[pb.Message(role="user", content="y" * (5 * 2**20))])

    async def body() -> None:
        async with serving(aeng, http_port=0) as (handle, client):
            raw_create = _raw_rpc(client, "CreateSession", pb.SessionInfo)
            gaps: list[float] = []

            gc.collect()
            base = _rss()
            peak = [base]
            stop = threading.Event()

            def sample() -> None:
                while not stop.is_set():
                    peak[0] = max(peak[0], _rss())
                    time.sleep(0.01)

            sampler = threading.Thread(target=sample)
            sampler.start()
            streaming = asyncio.create_task(_stream_gaps(client, gaps, 400))
            while not gaps:  # the stream is under way
                await asyncio.sleep(0.01)
            try:
                # 50 MB CreateSession: over the gRPC message limit.
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await raw_create(big_session)
                assert info.value.code() == Code.RESOURCE_EXHAUSTED
                # 5 MB CreateSession: under it, but refused by the character bound before tokenizing.
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await client.stub.CreateSession(mid_session)
                assert info.value.code() == Code.INVALID_ARGUMENT
                assert "messages[0].content" in (info.value.details() or "")
                # 50 MB chunked HTTP body: 413 once the limit is read, the rest never sent.
                status, sent = await _chunked_post(handle.http_port, "/v1/completions", BIG)
                assert status == 413
                assert sent < BIG
                await streaming
            finally:
                stop.set()
                sampler.join()
            assert max(gaps[1:]) < 1.0, f"longest gap between tokens {max(gaps[1:]):.2f} s"
            assert peak[0] - base < 2 * BIG, f"RSS grew {(peak[0] - base) / 2**20:.0f} MiB"

    run(body(), timeout=300)


def test_long_token_id_lists_are_refused_without_stalling_streams(aeng: AsyncEngine) -> None:
    """Millions of token ids (well under the 32 MiB body and message limits) held the event loop for seconds
    before the prompt's length was checked: a path string per id in the UTF-8 check, pydantic trying the ids
    as strings first, gRPC's list() of the repeated field. Now they are refused by their length."""
    num_ids = 3_000_000
    model = aeng.engine.config.model.served_model_names()[0]
    prompt_body = json.dumps({"model": model, "prompt": [5] * num_ids, "max_tokens": 2}).encode()
    vocab = aeng.engine.arch.vocab_size
    allowed_body = json.dumps({"model": model, "prompt": [5], "max_tokens": 2,
                               "allowed_token_ids": [5] * (vocab + 1)}).encode()
    grpc_prompt = pb.GenerateRequest(prompt_token_ids=[5] * num_ids,
                                     sampling=pb.SamplingParams(max_tokens=2)).SerializeToString()
    grpc_allowed = pb.GenerateRequest(prompt_token_ids=[5], sampling=pb.SamplingParams(
        max_tokens=2, allowed_token_ids=[5] * (vocab + 1), stop_token_ids=[6])).SerializeToString()

    async def body() -> None:
        async with serving(aeng, http_port=0) as (handle, client):
            raw_generate = _raw_rpc(client, "Generate", pb.GenerateEvent, streams=True)
            gaps: list[float] = []
            streaming = asyncio.create_task(_stream_gaps(client, gaps, 300))
            while not gaps:
                await asyncio.sleep(0.01)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{handle.http_port}", timeout=60) as http:
                headers = {"content-type": "application/json"}
                r = await http.post("/v1/completions", content=prompt_body, headers=headers)
                assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
                r = await http.post("/v1/completions", content=allowed_body, headers=headers)
                assert r.status_code == 400 and r.json()["error"]["param"] == "allowed_token_ids", r.text
                assert "list each id once" in r.json()["error"]["message"]
            for raw, field in ((grpc_prompt, "max_model_len"), (grpc_allowed, "sampling.allowed_token_ids")):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    async for _ in raw_generate(raw):
                        pass
                assert info.value.code() == Code.INVALID_ARGUMENT and field in (info.value.details() or "")
            await streaming
            assert max(gaps[1:]) < 1.0, f"longest gap between tokens {max(gaps[1:]):.2f} s"

    run(body(), timeout=300)


def test_the_utf8_check_skips_number_lists_but_not_text_after_them() -> None:
    from agentserve.chat.limits import EdgeLimitError, check_utf8

    check_utf8({"prompt": list(range(1000)), "bias": {"5": 1.5}, "flags": [True, None, 2.0]}, "")
    with pytest.raises(EdgeLimitError, match=r"tools\[0\]\.enum\[2\] is not valid UTF-8"):
        check_utf8({"tools": [{"enum": [1, 2, "\ud800"]}]}, "")


def test_http_limits_name_the_field(strict: AsyncEngine) -> None:
    deep: Any = {"type": "string"}
    for _ in range(8):
        deep = {"type": "object", "properties": {"a": deep}}
    cases = [
        ({"messages": [{"role": "user", "content": "hi"}] * 5}, "messages", "max-messages"),
        ({"tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(3)]}, "tools", "max-tools"),
        ({"stop": ["a", "b", "c", "d"]}, "stop", "max-stop-strings"),
        ({"stop": ["x" * 17]}, "stop[0]", "max-stop-string-chars"),
        ({"bad_words": ["a", "b", "c", "d"]}, "bad_words", "max-bad-words"),
        ({"bad_words": ["x" * 17]}, "bad_words[0]", "max-bad-word-chars"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": deep}}},
         "response_format.json_schema.schema", "max-schema-depth"),
        ({"guided_json": {"type": "object", "description": "d" * 3000}}, "guided_json", "max-schema-bytes"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": deep}}]},
         "tools[0].function.parameters", "max-schema-depth"),
    ]

    async def body() -> None:
        async with serving(strict, http_port=0) as (handle, client):
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{handle.http_port}", timeout=60) as http:
                for fields, param, flag in cases:
                    req = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **fields}
                    r = await http.post("/v1/chat/completions", json=req)
                    assert r.status_code == 400, (fields, r.text)
                    err = r.json()["error"]
                    assert err["param"] == param and flag in err["message"], err
                # gRPC: the same limits, INVALID_ARGUMENT naming the field.
                msgs = [{"role": "user", "content": "hi"}] * 5
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await client.create_session(msgs)
                assert info.value.code() == Code.INVALID_ARGUMENT and "messages" in info.value.details()
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await client.create_session([{"role": "user", "content": "hi"}], tools=[
                        {"type": "function", "function": {"name": "f", "parameters": deep}}])
                assert info.value.code() == Code.INVALID_ARGUMENT
                assert "tools[0].parameters_json" in info.value.details() and "max-schema-depth" in info.value.details()
                s = await client.create_session([{"role": "system", "content": "be brief"}])
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await s.run_turn([{"role": "user", "content": "hi"}], max_tokens=2, stop=["a", "b", "c", "d"])
                assert info.value.code() == Code.INVALID_ARGUMENT and "sampling.stop" in info.value.details()
                await s.close()

    run(body(), timeout=300)


def test_request_chat_template_needs_the_flag(aeng: AsyncEngine) -> None:
    # 10^10 copies of the message if it ran to the end: the bounded rendering stops it early.
    expanding = ("{% for i in range(100000) %}{% for j in range(100000) %}{{ messages[0]['content'] }}"
                 "{% endfor %}{% endfor %}")

    async def body(trust: bool) -> None:
        config = aeng.engine.config
        config = config.model_copy(update={"server": config.server.model_copy(
            update={"trust_request_chat_template": trust})})
        from agentserve.service.serve import running_server

        async with running_server(config, async_engine=aeng, grpc_port=None, http_port=0) as handle:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{handle.http_port}", timeout=60) as http:
                base = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
                simple = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
                for fields, param in (({"chat_template": simple}, "chat_template"),
                                      ({"chat_template_kwargs": {"chat_template": simple}},
                                       "chat_template_kwargs.chat_template")):
                    r = await http.post("/v1/chat/completions", json={**base, **fields})
                    if trust:
                        assert r.status_code == 200, r.text
                        assert r.json()["usage"]["prompt_tokens"] == len(aeng.engine.encode("hi", False))
                    else:
                        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
                        assert "--trust-request-chat-template" in r.json()["error"]["message"]
                if trust:  # allowed, but its output is bounded: 137 bytes must not become megabytes of tokens
                    r = await http.post("/v1/chat/completions", json={**base, "chat_template": expanding})
                    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text

    run(body(False))
    run(body(True))


def test_lone_surrogates_are_400_naming_the_field(aeng: AsyncEngine) -> None:
    async def body() -> None:
        async with serving(aeng, http_port=0) as (handle, client):
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{handle.http_port}", timeout=60) as http:
                cases = [
                    ("/v1/completions", '{"prompt": "a\\ud800b", "max_tokens": 2}', "prompt"),
                    ("/v1/completions", '{"prompt": "ab", "model": "m\\udfff", "max_tokens": 2}', "model"),
                    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 2}',
                     "messages[0].content"),
                    ("/v1/completions", '{"prompt": "ab", "stop": ["\\ud801"], "max_tokens": 2}', "stop[0]"),
                    # Endpoints that used to answer 500 (the tokenizer's TypeError, or the error or the stored
                    # metadata echoing the string back and failing to encode as UTF-8).
                    ("/tokenize", '{"prompt": "a\\ud800"}', "prompt"),
                    ("/tokenize", '{"messages": [{"role": "user", "content": "\\udc00"}]}', "messages[0].content"),
                    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, '
                                             '"logit_bias": {"\\ud800": 1}}', "logit_bias.\ud800"),
                    ("/v1/conversations", '{"metadata": {"k": "\\ud800"}}', "metadata.k"),
                    ("/v1/conversations", '{"items": [{"role": "user", "content": "\\ud800"}]}', "items[0].content"),
                    ("/v1/responses/input_tokens", '{"input": "\\ud800"}', "input"),
                ]
                for path, raw, param in cases:
                    r = await http.post(path, content=raw.encode(), headers={"Content-Type": "application/json"})
                    assert r.status_code == 400, (raw, r.text)
                    err = r.json()["error"]
                    assert err["param"] == param and "UTF-8" in err["message"], err
                # Anthropic's count_tokens answers in Anthropic's shape, naming its own field.
                r = await http.post("/v1/messages/count_tokens", content=b'{"model": "m", "messages": [{"role": "user", '
                                    b'"content": "\\ud800"}]}', headers={"Content-Type": "application/json"})
                assert r.status_code == 400 and r.json()["type"] == "error", r.text
                assert r.json()["error"]["message"].startswith("messages[0].content is not valid UTF-8"), r.text
                # A conversation's later metadata and items are checked as its first ones are.
                conv = (await http.post("/v1/conversations", json={"metadata": {"k": "v"}})).json()["id"]
                for path, raw, param in [(f"/v1/conversations/{conv}", '{"metadata": {"k": "\\udfff"}}', "metadata.k"),
                                         (f"/v1/conversations/{conv}/items",
                                          '{"items": [{"role": "user", "content": [{"type": "input_text", '
                                          '"text": "\\ud800"}]}]}', "items[0].content[0].text")]:
                    r = await http.post(path, content=raw.encode(), headers={"Content-Type": "application/json"})
                    assert r.status_code == 400 and r.json()["error"]["param"] == param, (raw, r.text)
                got = (await http.get(f"/v1/conversations/{conv}")).json()
                assert got["metadata"] == {"k": "v"}, got

    run(body())


def test_small_request_not_blocked_behind_large_tokenization() -> None:
    class SlowTokenizer:
        def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
            if len(text) > 100:
                time.sleep(3.0)  # a huge prompt
            return [ord(c) for c in text]

    pool = RenderPool(SlowTokenizer(), max_model_len=1024, limits=ServerConfig())

    async def body() -> float:
        big = asyncio.ensure_future(pool.run(lambda tok: pool.encode(tok, "z" * 1000, "prompt",
                                                                      add_special_tokens=False)))
        await asyncio.sleep(0.1)
        t0 = time.monotonic()
        small = await pool.run(lambda tok: pool.encode(tok, "hi", "prompt", add_special_tokens=False))
        waited = time.monotonic() - t0
        assert small == [ord("h"), ord("i")]
        assert not big.done()
        assert len(await big) == 1000
        return waited

    try:
        assert run(body()) < 1.0
        with pytest.raises(ValueError, match="context length"):
            pool.check_chars(1024 * 32 + 1, "prompt")
    finally:
        pool.close()


def test_offline_api_shares_the_limits() -> None:
    from agentserve.llm import LLM
    from agentserve.sampling_params import SamplingParams
    from conftest_grpc import model_path

    llm = LLM(model_path(), device="cpu", dtype="float32", max_model_len=256, num_blocks=32, max_stop_strings=2)
    with pytest.raises(ValueError, match="max-stop-strings"):
        llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2, stop=["a", "b", "c"]))
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2, stop=["a", "b"], ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 2


def test_oversized_turn_is_refused_and_the_session_stays_usable(aeng: AsyncEngine) -> None:
    async def body() -> None:
        async with serving(aeng) as (handle, client):
            s = await client.create_session([{"role": "system", "content": "be brief"}])
            t0 = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await s.run_turn([{"role": "user", "content": "z" * (2 * 2**20)}], max_tokens=2)
            assert info.value.code() == Code.INVALID_ARGUMENT
            assert "messages[0].content" in info.value.details() and "context length" in info.value.details()
            assert time.monotonic() - t0 < 5.0  # refused by the bound, not after tokenizing 2 MiB
            assert not (await s.refresh()).busy
            out = await s.run_turn([{"role": "user", "content": "hi"}], max_tokens=2, ignore_eos=True)
            assert out.done.usage.completion_tokens == 2 and out.done.session.num_turns == 1
            await s.close()

    run(body())
