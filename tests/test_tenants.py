"""Tenants (issue 10): each API key is a tenant. Another tenant's sessions are NOT_FOUND on every
session call and missing from ListSessions; the prefix cache is per tenant (the same prompt from
another tenant has cached_tokens == 0, over gRPC sessions, gRPC Generate and HTTP alike, while the
same tenant gets a hit); per-tenant and global limits give RESOURCE_EXHAUSTED / HTTP 429."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable

import grpc
import httpx
import pytest

from agentserve.adapters.client import AgentClient
from agentserve.cli import build_parser, engine_config_from_args
from agentserve.config import EngineConfig
from agentserve.service.serve import ServerHandle, running_server
from agentserve.service.tenants import ANONYMOUS, Tenant, TenantLimitError, Tenants, load_api_keys, parse_api_key_lines
from conftest_grpc import model_path, run

Code = grpc.StatusCode
# Long enough for several full KV pages (16 tokens each), so a prefix-cache hit shows in cached_tokens.
SYSTEM = {"role": "system", "content": "You are the build agent of project Quartz. Follow the release checklist: "
                                       "run the unit tests, lint every module, bump the version, tag the commit, "
                                       "write the changelog and publish the wheel. Answer in one short line."}
USER = [{"role": "user", "content": "What is the next step?"}]
HTTP_SYSTEM = {"role": "system", "content": "You review pull requests of project Basalt: check the tests, the "
                                            "docs and the changelog, then approve or request changes in one line."}
KEY_FILE = """\
# tenants of the test server
key-alice:alice
key-alice-2:alice   # a second key of the same tenant

key-bob:bob
"""


def _key_file(tmp_path: Path) -> str:
    path = tmp_path / "keys.txt"
    path.write_text(KEY_FILE)
    return str(path)


def _config(tmp_path: Path, **kw: Any) -> EngineConfig:
    return EngineConfig.from_kwargs(model_path(), device="cpu", num_blocks=256, max_model_len=1024, dtype="float32",
                                    served_model_name="tiny", api_key_file=_key_file(tmp_path), **kw)


async def _code(coro: Awaitable[Any]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await coro
    return err.value.code(), err.value.details() or ""


@contextlib.asynccontextmanager
async def _clients(handle: ServerHandle, *keys: str) -> AsyncIterator[list[AgentClient]]:
    assert handle.address is not None
    clients = [AgentClient(handle.address, api_key=k) for k in keys]
    try:
        yield clients
    finally:
        for c in clients:
            await c.close()


# --- the key file --------------------------------------------------------------------------------
def test_api_key_file_parses(tmp_path: Path) -> None:
    assert parse_api_key_lines(KEY_FILE.splitlines(), "f") == [
        ("key-alice", "alice"), ("key-alice-2", "alice"), ("key-bob", "bob")]
    keys = load_api_keys(["cli-key"], _key_file(tmp_path))
    assert keys[0] == ("cli-key", None) and len(keys) == 4
    tenants = Tenants(keys)
    assert tenants.names == ["alice", "bob", "tenant-1"]  # a key without a name: its position, never the key
    assert tenants.authenticate("key-alice") == tenants.authenticate("key-alice-2") == Tenant("alice")
    assert tenants.authenticate("key-bob") == Tenant("bob")
    assert tenants.authenticate("wrong") is None and tenants.authenticate(None) is None
    assert Tenants().authenticate(None) == Tenant(ANONYMOUS)  # no keys: one anonymous tenant
    with pytest.raises(ValueError, match="line 2: the tenant name"):
        parse_api_key_lines(["k1:ok", "k2:bad name!"], "f")
    with pytest.raises(ValueError, match="line 1: the API key is empty") as err:
        parse_api_key_lines([":alice"], "f")
    with pytest.raises(ValueError, match="one tenant") as err:
        Tenants([("dup-key", "alice"), ("dup-key", "bob")])
    assert "dup-key" not in str(err.value)  # errors never carry a key
    # An unnamed key's tenant-<n> named explicitly by another key would silently merge the two tenants.
    with pytest.raises(ValueError, match="API key #1 has no tenant name") as err:
        Tenants([("admin-key", None), ("carol-key", "tenant-1")])
    assert "admin-key" not in str(err.value) and "carol-key" not in str(err.value)
    assert Tenants([("admin-key", None), ("carol-key", "tenant-2")]).names == ["tenant-1", "tenant-2"]
    with pytest.raises(ValueError, match="keys.missing"):
        load_api_keys(None, str(tmp_path / "keys.missing"))
    # The CLI: --api-key repeats, --api-key-file and the limits are flags.
    args = build_parser().parse_args(["serve", "--model", "m", "--api-key", "a", "--api-key", "b",
                                      "--api-key-file", "keys.txt", "--max-sessions-per-tenant", "7",
                                      "--max-requests-per-tenant", "3", "--max-sessions", "9"])
    server = engine_config_from_args(args).server
    assert (server.api_key, server.api_key_file) == (["a", "b"], "keys.txt")
    assert (server.max_sessions_per_tenant, server.max_requests_per_tenant, server.max_sessions) == (7, 3, 9)


def test_cache_salt_namespaces() -> None:
    assert Tenant(ANONYMOUS).cache_salt(None) is None  # no tenants: the request's own salt, as before
    assert Tenant(ANONYMOUS).cache_salt("s") == "s"
    salts = {Tenant("a").cache_salt(None), Tenant("a").cache_salt("s"), Tenant("b").cache_salt(None),
             Tenant("b").cache_salt("s"), Tenant(ANONYMOUS).cache_salt("s")}
    assert len(salts) == 5


# --- sessions and the prefix cache across tenants ---------------------------------------------------
def test_sessions_and_prefix_cache_are_per_tenant(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_server(_config(tmp_path), grpc_port=0, http_port=0) as handle, \
                _clients(handle, "key-alice", "key-alice-2", "key-bob") as (alice, alice2, bob):
            s = await alice.create_session([SYSTEM])
            first = await s.run_turn(USER, max_tokens=2, temperature=0.0)
            assert first.done.usage.cached_tokens == 0

            # Another tenant cannot see or touch the session: NOT_FOUND, as for an unknown id.
            for coro in (bob.get_session(s.id), bob.session(s.id).run_turn(USER, max_tokens=1),
                         bob.session(s.id).fork(), bob.session(s.id).close()):
                code, msg = await _code(coro)
                assert code == Code.NOT_FOUND and "not found" in msg
            assert await bob.list_sessions() == []
            assert [x.session_id for x in await alice.list_sessions()] == [s.id]
            assert [x.session_id for x in await alice2.list_sessions()] == [s.id]  # same tenant, other key
            assert (await alice2.get_session(s.id)).info.num_turns == 1

            # The same conversation: no cache hit for the other tenant, a hit for the same tenant.
            b = await bob.create_session([SYSTEM])
            assert (await b.run_turn(USER, max_tokens=2, temperature=0.0)).done.usage.cached_tokens == 0
            a2 = await alice2.create_session([SYSTEM])
            hit = (await a2.run_turn(USER, max_tokens=2, temperature=0.0)).done.usage.cached_tokens
            assert hit >= 16, hit
            # A request's own cache_salt refines the tenant's namespace.
            a3 = await alice.create_session([SYSTEM], cache_salt="project-x")
            assert (await a3.run_turn(USER, max_tokens=2, temperature=0.0)).done.usage.cached_tokens == 0

            # Stateless gRPC Generate: the same.
            prompt = SYSTEM["content"] + " Now: the tests."
            assert (await alice.generate_done(prompt, max_tokens=1)).usage.cached_tokens == 0
            assert (await bob.generate_done(prompt, max_tokens=1)).usage.cached_tokens == 0
            assert (await alice2.generate_done(prompt, max_tokens=1)).usage.cached_tokens >= 16

            # HTTP: usage.prompt_tokens_details.cached_tokens (a conversation no tenant has sent yet).
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{handle.http_port}", timeout=60) as http:
                async def chat(key: str) -> int:
                    r = await http.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, json={
                        "model": "tiny", "messages": [HTTP_SYSTEM, {"role": "user", "content": "And over HTTP?"}],
                        "max_tokens": 1, "temperature": 0})
                    assert r.status_code == 200, r.text
                    return int(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])

                assert await chat("key-bob") == 0
                assert await chat("key-alice") == 0
                assert await chat("key-alice-2") >= 16
                r = await http.post("/v1/completions", headers={"Authorization": "Bearer key-carol"},
                                    json={"model": "tiny", "prompt": "hi", "max_tokens": 1})
                assert r.status_code == 401

            for sess in (s, b, a2, a3):
                await sess.close()
            assert await alice.list_sessions() == [] and await bob.list_sessions() == []

    run(main(), timeout=240)


# --- limits -----------------------------------------------------------------------------------------
def test_session_and_request_limits(tmp_path: Path) -> None:
    config = _config(tmp_path, max_sessions=3, max_sessions_per_tenant=2, max_requests_per_tenant=1)

    async def main() -> None:
        async with running_server(config, grpc_port=0, http_port=0) as handle, \
                _clients(handle, "key-alice", "key-bob") as (alice, bob):
            a1 = await alice.create_session([SYSTEM])
            a2 = await alice.create_session([SYSTEM])
            for coro in (alice.create_session([SYSTEM]), a1.fork()):
                code, msg = await _code(coro)
                assert code == Code.RESOURCE_EXHAUSTED and "limit 2" in msg
            b1 = await bob.create_session([SYSTEM])
            code, msg = await _code(bob.create_session([SYSTEM]))  # the server's limit (3), not bob's
            assert code == Code.RESOURCE_EXHAUSTED and "limit 3" in msg
            await a2.close()
            a2 = await alice.create_session([SYSTEM])

            # One request in flight per tenant: while alice's turn streams, her next request is refused
            # (gRPC and HTTP share the count); bob's is not.
            events = a1.turn(USER, max_tokens=400, ignore_eos=True, temperature=0.0)
            await events.__anext__()
            code, msg = await _code(alice.generate_done("hi", max_tokens=1))
            assert code == Code.RESOURCE_EXHAUSTED and "in flight" in msg
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{handle.http_port}", timeout=60) as http:
                body = {"model": "tiny", "prompt": "hi", "max_tokens": 1}
                r = await http.post("/v1/completions", headers={"Authorization": "Bearer key-alice"}, json=body)
                assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded", r.text
                r = await http.post("/v1/completions", headers={"Authorization": "Bearer key-bob"}, json=body)
                assert r.status_code == 200, r.text
                assert (await bob.generate_done("hi", max_tokens=1)).usage.completion_tokens == 1
                await events.aclose()  # cancels alice's turn: her slot is free again
                for _ in range(100):
                    if handle.tenants.in_flight(Tenant("alice")) == 0:
                        break
                    await asyncio.sleep(0.02)
                r = await http.post("/v1/completions", headers={"Authorization": "Bearer key-alice"}, json=body)
                assert r.status_code == 200, r.text
            assert (await alice.generate_done("hi", max_tokens=1)).usage.completion_tokens == 1
            for sess in (a1, a2, b1):
                await sess.close()

    run(main(), timeout=240)


def test_a_requests_n_counts_against_its_tenants_request_limit(tmp_path: Path) -> None:
    """The engine's queue counts sequences (prompts x n): a tenant's request limit counted one per request, so
    one request of n=32 under a limit of 1 filled the queue and got other tenants 503s."""
    config = _config(tmp_path, max_requests_per_tenant=4)

    async def main() -> None:
        async with running_server(config, grpc_port=0, http_port=0) as handle:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{handle.http_port}", timeout=60) as http:
                alice = {"Authorization": "Bearer key-alice"}
                body = {"model": "tiny", "prompt": "hi", "max_tokens": 1}
                r = await http.post("/v1/completions", headers=alice, json=dict(body, n=5))
                assert r.status_code == 429 and "this request is 5 sequences" in r.json()["error"]["message"], r.text
                r = await http.post("/v1/completions", headers=alice, json=dict(body, prompt=["a", "b", "c"], n=2))
                assert r.status_code == 429, r.text  # 3 prompts x n=2
                r = await http.post("/v1/completions", headers=alice, json=dict(body, n=4))
                assert r.status_code == 200 and len(r.json()["choices"]) == 4, r.text
                chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "n": 5}
                r = await http.post("/v1/chat/completions", headers=alice, json=chat)
                assert r.status_code == 429, r.text
            assert handle.tenants.in_flight(Tenant("alice")) == 0  # every slot back, refused or served

    run(main(), timeout=240)


def test_request_limit_applies_to_keyed_tenants_only() -> None:
    """Without API keys a server has one anonymous tenant: only the engine's queue bounds it (as in
    vLLM); with keys each tenant is held to max_requests_per_tenant."""
    tenants = Tenants(max_requests_per_tenant=1)
    anonymous = Tenant(ANONYMOUS)
    for _ in range(3):
        tenants.acquire(anonymous)
    assert tenants.in_flight(anonymous) == 3
    keyed = Tenant("a")
    tenants.acquire(keyed)
    with pytest.raises(TenantLimitError):
        tenants.acquire(keyed)


def test_a_sequential_client_at_its_limit_finds_its_slot_free_after_each_reply() -> None:
    """The request slot is given back before the reply's last bytes leave, so a client that sends its next
    request as soon as it has the previous reply is never refused (it was freed after the send: a race)."""
    from agentserve.adapters.openai.app import create_app
    from agentserve.adapters.openai.server import ServerThread
    from agentserve.engine.async_engine import AsyncEngine
    from agentserve.engine.engine import Engine

    config = EngineConfig.from_kwargs(model_path(), device="cpu", num_blocks=64, max_model_len=256,
                                      served_model_name="tiny")
    aeng = AsyncEngine(Engine(config))
    tenants = Tenants([("key-a", "alice")], max_requests_per_tenant=1)
    server = ServerThread(create_app(aeng, config, tenants=tenants)).start()
    alice = Tenant("alice")
    try:
        with httpx.Client(base_url=server.url, timeout=60, headers={"Authorization": "Bearer key-a"}) as http:
            for i in range(40):
                stream = i % 2 == 1
                r = http.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 1,
                                                       "stream": stream})
                assert r.status_code == 200, (i, r.text)
                assert tenants.in_flight(alice) == 0, f"request {i} (stream={stream}): the slot is still held"
    finally:
        server.stop()
        aeng.shutdown()
