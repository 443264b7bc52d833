"""ListSessions pages as Google AIP-158 says, over a real grpcio client and server (tiny CPU model):
pages of page_size sessions in creation order, each session exactly once across the pages even when
sessions are created or closed between page requests; page_size 0 is the default (100), larger than
1000 is coerced to 1000, negative is INVALID_ARGUMENT naming page_size; the page token is opaque and
checked: garbage, a tampered token or another tenant's is INVALID_ARGUMENT naming page_token and
shows nothing of the other tenant; the last page (and an empty list) has an empty next_page_token."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from pathlib import Path
from typing import AsyncIterator

import grpc
import pytest

from agentserve.adapters.client import AgentClient
from agentserve.engine.async_engine import AsyncEngine
from agentserve.service import agent_pb2 as pb
from agentserve.service import agent_pb2_grpc as pb_grpc
from agentserve.service.serve import running_server
from conftest_grpc import SYSTEM, make_engine, rpc_status, run, serving

Code = grpc.StatusCode
# The sizes AIP-158 leaves to the server, written out here rather than imported: the test states them.
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


@pytest.fixture(scope="module")
def aeng() -> AsyncEngine:
    engine = make_engine(num_blocks=64)
    yield engine
    engine.shutdown()


async def _create(client: AgentClient, n: int) -> list[str]:
    """n sessions, one after the other (so their creation order is the order of the calls)."""
    return [(await client.create_session([SYSTEM], metadata={"n": str(i)})).id for i in range(n)]


async def _create_many(stub: pb_grpc.AgentServiceStub, n: int) -> set[str]:
    """n empty sessions, created concurrently (their order is the server's to tell)."""
    ids: set[str] = set()
    for start in range(0, n, 100):
        infos = await asyncio.gather(*(stub.CreateSession(pb.CreateSessionRequest())
                                       for _ in range(min(100, n - start))))
        ids.update(i.session_id for i in infos)
    assert len(ids) == n
    return ids


async def _page(client: AgentClient, size: int, token: str = "") -> tuple[list[str], str]:
    sessions, next_token = await client.list_sessions_page(size, token)
    return [s.session_id for s in sessions], next_token


async def _close_all(client: AgentClient) -> None:
    async for info in client.iter_sessions(page_size=7):  # closing while paging: each still listed once
        await client.session(info.session_id).close()
    assert await client.list_sessions() == []


def test_pages_list_every_session_once_in_creation_order(aeng: AsyncEngine) -> None:
    async def body() -> None:
        async with serving(aeng) as (_handle, client):
            created = await _create(client, 7)
            fork = (await client.session(created[1]).fork()).id  # a fork is created last, so it lists last
            expected = created + [fork]
            for size in (1, 3, 4, 8, 9):
                pages, token, first = [], "", True
                while first or token:
                    ids, token = await _page(client, size, token)
                    pages.append(ids)
                    first = False
                assert sum(pages, []) == expected, size
                # Full pages until the last, which has the rest; no empty page after an exact fit.
                assert [len(p) for p in pages] == [size] * (len(expected) // size) + (
                    [len(expected) % size] if len(expected) % size else []), size
            assert [s.session_id async for s in client.iter_sessions(page_size=3)] == expected
            assert [s.session_id for s in await client.list_sessions()] == expected  # one default page
            infos = await client.list_sessions(page_size=2)
            assert [dict(s.metadata) for s in infos] == [{"n": "0"}, {"n": "1"}]  # whole SessionInfos
            await _close_all(client)

    run(body())


def test_sessions_created_and_closed_between_pages(aeng: AsyncEngine) -> None:
    async def body() -> None:
        async with serving(aeng) as (_handle, client):
            a, b, c, d, e, f = await _create(client, 6)
            page1, token = await _page(client, 2)
            assert page1 == [a, b] and token
            after_page1 = token
            # Close the page's last session (where the token points), the next one, and one already
            # listed; create one: the next pages go on from where page 1 ended.
            for sid in (b, c, a):
                await client.session(sid).close()
            (g,) = await _create(client, 1)
            page2, token = await _page(client, 2, token)
            assert page2 == [d, e] and token
            await client.session(d).close()  # listed already: nothing shifts
            (h,) = await _create(client, 1)
            page3, token = await _page(client, 2, token)
            assert page3 == [f, g] and token
            page4, token = await _page(client, 2, token)
            assert page4 == [h] and token == ""
            # An older page's token still resumes there: a token is a position, not a snapshot.
            assert await _page(client, 10, after_page1) == ([e, f, g, h], "")
            await _close_all(client)

    run(body(), timeout=180)


def test_default_and_coerced_page_sizes(aeng: AsyncEngine) -> None:
    async def body() -> None:
        async with serving(aeng) as (handle, client):
            assert handle.address is not None
            async with grpc.aio.insecure_channel(handle.address) as channel:
                stub = pb_grpc.AgentServiceStub(channel)
                empty = await stub.ListSessions(pb.ListSessionsRequest())
                assert list(empty.sessions) == [] and empty.next_page_token == ""

                ids = await _create_many(stub, MAX_PAGE_SIZE + 2)
                first = await stub.ListSessions(pb.ListSessionsRequest())  # no fields: the default page
                assert len(first.sessions) == DEFAULT_PAGE_SIZE and first.next_page_token
                for size in (MAX_PAGE_SIZE + 1, 2**31 - 1):  # coerced to the maximum, not refused
                    big = await stub.ListSessions(pb.ListSessionsRequest(page_size=size))
                    assert len(big.sessions) == MAX_PAGE_SIZE and big.next_page_token
                    assert [s.session_id for s in big.sessions[:DEFAULT_PAGE_SIZE]] == [
                        s.session_id for s in first.sessions]
                rest = await stub.ListSessions(pb.ListSessionsRequest(page_size=size,
                                                                      page_token=big.next_page_token))
                assert len(rest.sessions) == 2 and rest.next_page_token == ""
                listed = [s.session_id for s in big.sessions] + [s.session_id for s in rest.sessions]
                assert sorted(listed) == sorted(ids)  # each once
                order = [(s.created_at, s.session_id) for s in list(big.sessions) + list(rest.sessions)]
                assert order == sorted(order)  # creation order, ties by id
            await _close_all(client)

    run(body(), timeout=300)


KEY_FILE = "key-alice:alice\nkey-alice-2:alice\nkey-bob:bob\n"


@contextlib.asynccontextmanager
async def _tenants(aeng: AsyncEngine, tmp_path: Path) -> AsyncIterator[tuple[AgentClient, AgentClient, AgentClient]]:
    (tmp_path / "keys.txt").write_text(KEY_FILE)
    config = aeng.engine.config
    config = config.model_copy(update={"server": config.server.model_copy(
        update={"api_key_file": str(tmp_path / "keys.txt")})})
    async with running_server(config, async_engine=aeng) as handle:
        assert handle.address is not None
        clients = [AgentClient(handle.address, api_key=k) for k in ("key-alice", "key-alice-2", "key-bob")]
        try:
            yield clients[0], clients[1], clients[2]
        finally:
            for c in clients:
                await c.close()


def _tampered(token: str) -> list[str]:
    """Edits a client could make to a token: its position moved back, a byte flipped, cut, lengthened."""
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    start = raw.rindex(b"[")  # the cursor's JSON, after the tag (which may hold a '[' byte too)
    version, created_at, session_id = json.loads(raw[start:])
    moved = raw[:start] + json.dumps([version, created_at - 3600.0, session_id]).encode()
    flipped = raw[:-1] + bytes([raw[-1] ^ 1])
    return [base64.urlsafe_b64encode(b).rstrip(b"=").decode() for b in (moved, flipped, raw[1:])] + [
        token[:-2], token + "A", token + "=", token.replace(token[0], "+" if token[0] != "+" else "-", 1)]


def test_bad_page_size_and_page_tokens_are_invalid_argument(aeng: AsyncEngine, tmp_path: Path) -> None:
    async def body() -> None:
        async with _tenants(aeng, tmp_path) as (alice, alice2, bob):
            mine = await _create(alice, 3)
            theirs = await _create(bob, 2)
            code, msg = await rpc_status(alice.list_sessions(page_size=-1))
            assert code == Code.INVALID_ARGUMENT and "page_size" in msg and "-1" in msg

            ids, token = await _page(alice, 1)
            assert ids == mine[:1] and token
            # The same tenant through its other key: the token is the tenant's, not the key's.
            assert (await _page(alice2, 5, token)) == (mine[1:], "")
            bad = ["garbage", "!!!!", "AAAA", "a" * 4096, "é", token[::-1]] + _tampered(token)
            for t in bad:
                code, msg = await rpc_status(alice.list_sessions(page_size=5, page_token=t))
                assert code == Code.INVALID_ARGUMENT and "page_token" in msg, (t, code, msg)
            # Another tenant's token: refused the same way, naming nothing of alice's.
            code, msg = await rpc_status(bob.list_sessions(page_size=5, page_token=token))
            assert code == Code.INVALID_ARGUMENT and "page_token" in msg
            assert "alice" not in msg and not any(sid in msg for sid in mine)
            bobs, bob_token = await _page(bob, 1)
            assert bobs == theirs[:1]
            code, msg = await rpc_status(alice.list_sessions(page_token=bob_token))
            assert code == Code.INVALID_ARGUMENT and "page_token" in msg and "bob" not in msg
            # Each tenant pages its own list only.
            assert [s.session_id async for s in bob.iter_sessions(page_size=1)] == theirs
            assert [s.session_id async for s in alice2.iter_sessions(page_size=2)] == mine
            await _close_all(alice)
            assert [s.session_id for s in await bob.list_sessions()] == theirs
            await _close_all(bob)
            assert await alice.list_sessions_page() == ([], "")

    run(body(), timeout=180)


def test_a_token_does_not_outlive_its_server(aeng: AsyncEngine) -> None:
    async def body() -> None:
        async with serving(aeng) as (_handle, client):
            await _create(client, 2)
            _ids, token = await _page(client, 1)
            await _close_all(client)
        async with serving(aeng) as (_handle, client):
            await _create(client, 2)
            code, msg = await rpc_status(client.list_sessions(page_token=token))
            assert code == Code.INVALID_ARGUMENT and "page_token" in msg
            await _close_all(client)

    run(body())
