"""Multi-LoRA over the servers: gRPC sessions bound to an adapter keep it across turns, swap-out /
swap-in and fork (every turn's tokens equal PEFT's merged model on the turn's whole prompt);
Generate.adapter; LoadAdapter / UnloadAdapter and their status codes; HTTP `model` naming an adapter,
/v1/models with `parent`, POST /v1/load_lora_adapter and /v1/unload_lora_adapter (400 / 404 / 409)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from agentserve.adapters.openai.metrics import parse_metrics
from agentserve.sessions.types import SessionState
from agentserve.testing import tiny_model_cached
from conftest_grpc import SYSTEM, make_engine, rpc_status, run, serving, swap_gb_for
from helpers.lora import ALL_MODULES, build_peft_adapter, peft_greedy

ARCH = "qwen2"
GREEDY: dict[str, Any] = dict(temperature=0.0, max_tokens=6, ignore_eos=True, return_token_ids=True)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tiny_model_cached(ARCH)
    root = tmp_path_factory.mktemp("peft")
    return {"a": build_peft_adapter(base, root / "a", seed=11, r=8, lora_alpha=16, target_modules=list(ALL_MODULES)),
            "b": build_peft_adapter(base, root / "b", seed=12, r=16, lora_alpha=16,
                                    target_modules=["q_proj", "v_proj", "down_proj"])}


def _exact(adapter: Path, turn: Any) -> None:
    prompt = list(turn.done.prompt_token_ids)
    assert turn.token_ids == peft_greedy(tiny_model_cached(ARCH), adapter, [prompt], GREEDY["max_tokens"])[0]


def test_grpc_sessions_generate_and_adapter_rpcs(adapters: dict[str, Path], tmp_path: Path) -> None:
    aeng = make_engine(ARCH, enable_lora=True, max_loras=1, max_lora_rank=16, num_blocks=128,
                       swap_space_gb=swap_gb_for(ARCH, 32), lora_modules={"a": str(adapters["a"])})

    async def body() -> None:
        async with serving(aeng) as (handle, client):
            models = await client.list_models()
            assert list(models[0].adapters) == ["a"]
            code, msg = await rpc_status(client.load_adapter("b", str(tmp_path / "nowhere")))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "does not exist" in msg
            code, _ = await rpc_status(client.load_adapter("", str(adapters["b"])))
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            await client.load_adapter("b", str(adapters["b"]))
            assert list((await client.list_models())[0].adapters) == ["a", "b"]

            # Stateless generation with an adapter (the other one holds the only slot meanwhile).
            prompt = list(range(5, 40))
            done = await client.generate_done(prompt_token_ids=prompt, adapter="b", **GREEDY)
            assert list(done.token_ids) == peft_greedy(tiny_model_cached(ARCH), adapters["b"], [prompt], 6)[0]
            code, msg = await rpc_status(client.generate_done(prompt_token_ids=prompt, adapter="zzz", **GREEDY))
            assert code == grpc.StatusCode.NOT_FOUND and "zzz" in msg

            # A session bound to "a": turns, swap-out / swap-in, fork — all on a's weights.
            session = await client.create_session([SYSTEM], adapter="a")
            assert session.info.adapter == "a"
            _exact(adapters["a"], await session.run_turn([{"role": "user", "content": "Hello there."}], **GREEDY))
            code, msg = await rpc_status(client.unload_adapter("a"))
            assert code == grpc.StatusCode.FAILED_PRECONDITION and session.info.session_id in msg
            store = handle.store

            def evict() -> SessionState:
                s = store.sessions[session.info.session_id]
                store.residency.evict(s)
                return s.state

            assert await aeng.run(evict) in (SessionState.SWAPPED, SessionState.EVICTED)
            _exact(adapters["a"], await session.run_turn([{"role": "user", "content": "And then?"}], **GREEDY))
            child = await session.fork()
            assert child.info.adapter == "a"
            _exact(adapters["a"], await child.run_turn([{"role": "user", "content": "Fork it."}], **GREEDY))
            _exact(adapters["a"], await session.run_turn([{"role": "user", "content": "Parent."}], **GREEDY))
            await child.close()
            await client.unload_adapter("a", drain=True)  # the open session keeps its weights
            _exact(adapters["a"], await session.run_turn([{"role": "user", "content": "Drained."}], **GREEDY))
            await session.close()
            await client.load_adapter("a", str(adapters["a"]))  # loaded again: a new generation

            await client.unload_adapter("a")  # nothing uses it any more
            code, _ = await rpc_status(client.unload_adapter("a"))
            assert code == grpc.StatusCode.NOT_FOUND
            code, _ = await rpc_status(client.create_session([SYSTEM], adapter="a"))
            assert code == grpc.StatusCode.NOT_FOUND

    try:
        run(body(), timeout=300)
    finally:
        aeng.shutdown()


def test_grpc_adapter_rpcs_without_lora_are_unimplemented(adapters: dict[str, Path]) -> None:
    aeng = make_engine(ARCH, num_blocks=32)

    async def body() -> None:
        async with serving(aeng) as (_, client):
            code, msg = await rpc_status(client.load_adapter("a", str(adapters["a"])))
            assert code == grpc.StatusCode.UNIMPLEMENTED and "--enable-lora" in msg
            code, _ = await rpc_status(client.unload_adapter("a"))
            assert code == grpc.StatusCode.UNIMPLEMENTED

    try:
        run(body())
    finally:
        aeng.shutdown()


def test_http_adapter_endpoints_and_model_field(adapters: dict[str, Path], tmp_path: Path) -> None:
    aeng = make_engine(ARCH, enable_lora=True, max_loras=2, max_lora_rank=16, num_blocks=128,
                       served_model_name="tiny", lora_modules={"a": str(adapters["a"])})

    async def body() -> None:
        async with serving(aeng, http_port=0, with_client=False) as (handle, _):
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{handle.http_port}", timeout=60) as http:
                models = (await http.get("/v1/models")).json()["data"]
                assert {(m["id"], m["parent"]) for m in models} == {("tiny", None), ("a", "tiny")}

                r = await http.post("/v1/load_lora_adapter", json={"lora_name": "b", "lora_path": str(tmp_path)})
                assert r.status_code == 400 and "adapter_config.json" in r.json()["error"]["message"]
                r = await http.post("/v1/load_lora_adapter", json={"lora_name": "b"})
                assert r.status_code == 400 and "lora_path" in r.json()["error"]["message"]
                r = await http.post("/v1/load_lora_adapter", json={"lora_name": "b", "lora_path": str(adapters["b"])})
                assert r.status_code == 200 and "'b'" in r.text

                prompt = list(range(7, 30))
                texts: dict[str, str] = {}
                for name in ("b", "tiny"):
                    r = await http.post("/v1/completions", json={
                        "model": name, "prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True})
                    assert r.status_code == 200, r.text
                    ref = peft_greedy(tiny_model_cached(ARCH), adapters["b"] if name == "b" else None, [prompt], 6)[0]
                    texts[name] = r.json()["choices"][0]["text"]
                    # The streamed text withholds a trailing incomplete UTF-8 sequence (decode shows it as U+FFFD).
                    assert texts[name] == aeng.engine.tokenizer.decode(ref).rstrip("\ufffd"), name
                assert texts["b"] != texts["tiny"]
                metrics = parse_metrics((await http.get("/metrics")).text)
                assert metrics["agentserve_lora_adapters_loaded"] == 2 and metrics["agentserve_lora_max_loras"] == 2
                assert metrics["agentserve_lora_slot_loads_total"] >= 1 and metrics["agentserve_lora_disk_reads_total"] == 2
                assert metrics["agentserve_lora_adapters_running"] == 0 == metrics["agentserve_lora_adapters_waiting"]
                info = [line for line in (await http.get("/metrics")).text.splitlines()
                        if line.startswith("agentserve_lora_requests_info{")]
                assert len(info) == 1 and 'max_lora="2"' in info[0] and 'running_lora_adapters=""' in info[0]
                r = await http.post("/v1/completions", json={"model": "zzz", "prompt": "hi", "max_tokens": 2})
                assert r.status_code == 404

                # An open session bound to "b" holds it: 409, naming the session.
                snap = await handle.store.create([SYSTEM], adapter="b")
                r = await http.post("/v1/unload_lora_adapter", json={"lora_name": "b"})
                assert r.status_code == 409 and snap.session_id in r.json()["error"]["message"]
                r = await http.post("/v1/load_lora_adapter", json={"lora_name": "b", "lora_path": str(adapters["a"])})
                assert r.status_code == 409  # replacing it too
                await handle.store.close(snap.session_id)
                r = await http.post("/v1/unload_lora_adapter", json={"lora_name": "b"})
                assert r.status_code == 200
                r = await http.post("/v1/unload_lora_adapter", json={"lora_name": "b"})
                assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
                ids = [m["id"] for m in (await http.get("/v1/models")).json()["data"]]
                assert ids == ["tiny", "a"]

    try:
        run(body(), timeout=300)
    finally:
        aeng.shutdown()


def test_under_api_keys_only_the_loading_tenant_manages_an_adapter(adapters: dict[str, Path]) -> None:
    """Another tenant's load_inplace swapped an adapter's weights under its owner's requests, and its unload
    took the adapter away: under API keys an adapter loaded at run time is its loader's to replace and
    unload, and --lora-modules' adapters are no tenant's."""
    aeng = make_engine(ARCH, enable_lora=True, max_loras=2, max_lora_rank=16, num_blocks=128, served_model_name="tiny",
                       lora_modules={"a": str(adapters["a"])}, api_key=["key-alice", "key-bob"])

    def key(k: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {k}"}

    async def body() -> None:
        async with serving(aeng, http_port=0, with_client=False) as (handle, _):
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{handle.http_port}", timeout=60) as http:
                load = {"lora_name": "b", "lora_path": str(adapters["b"])}
                assert (await http.post("/v1/load_lora_adapter", json=load, headers=key("key-alice"))).status_code == 200
                for path, payload in (("/v1/load_lora_adapter", dict(load, lora_path=str(adapters["a"]), load_inplace=True)),
                                      ("/v1/unload_lora_adapter", {"lora_name": "b"}),
                                      ("/v1/unload_lora_adapter", {"lora_name": "a"})):
                    r = await http.post(path, json=payload, headers=key("key-bob"))
                    assert r.status_code == 409 and "only its loader manages it" in r.json()["error"]["message"], r.text
                assert aeng.engine.lora.manager.path_of("b") == adapters["b"]  # Alice's weights, untouched
                r = await http.post("/v1/unload_lora_adapter", json={"lora_name": "b"}, headers=key("key-alice"))
                assert r.status_code == 200
                # The name is free again: whoever loads it next owns it.
                assert (await http.post("/v1/load_lora_adapter", json=load, headers=key("key-bob"))).status_code == 200

    try:
        run(body(), timeout=300)
    finally:
        aeng.shutdown()
