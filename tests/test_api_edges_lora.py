"""Adversarial input to the LoRA management edge, over HTTP (raw httpx and the official openai client)
and gRPC: every bad load / unload gets a clear error naming the field (400 / 404 / 409;
INVALID_ARGUMENT / NOT_FOUND / ALREADY_EXISTS / FAILED_PRECONDITION), a name can never shadow the
base model or silently replace a loaded adapter, a reload is a new generation (no stale KV, sessions
keep the weights they started with), and a drained adapter whose directory is gone fails its own
requests alone."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest

from agentserve.testing import tiny_model_cached
from conftest_grpc import SYSTEM, make_engine, rpc_status, run_and_shutdown, serving
from helpers.api_edges import assert_error, completion_token_ids, greedy_body, wait_idle_and_clean
from helpers.lora import ALL_MODULES, build_peft_adapter, peft_greedy

ARCH = "qwen2"
PROMPT = list(range(7, 30))
LOAD, UNLOAD = "/v1/load_lora_adapter", "/v1/unload_lora_adapter"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tiny_model_cached(ARCH)
    other = tiny_model_cached(ARCH, seed=7, num_layers=1, hidden_size=32, num_heads=2, num_kv_heads=1,
                              intermediate_size=64)
    root = tmp_path_factory.mktemp("edge-peft")
    # Large B scales: each adapter's greedy tokens differ from the base model's and from each other's.
    return {"a": build_peft_adapter(base, root / "a", seed=11, r=8, lora_alpha=16, scale=30.0,
                                    target_modules=list(ALL_MODULES)),
            "b": build_peft_adapter(base, root / "b", seed=12, r=16, lora_alpha=16, scale=30.0,
                                    target_modules=["q_proj", "v_proj", "down_proj"]),
            "rank32": build_peft_adapter(base, root / "rank32", seed=13, r=32, lora_alpha=16, target_modules=["q_proj"]),
            "other_arch": build_peft_adapter(other, root / "other", seed=14, r=8, lora_alpha=16,
                                             target_modules=["q_proj"])}


def _reference(adapter: Path | None, prompt: list[int] = PROMPT, n: int = 6) -> list[int]:
    return peft_greedy(tiny_model_cached(ARCH), adapter, [prompt], n)[0]


def test_http_load_unload_bad_input_and_model_field(adapters: dict[str, Path], tmp_path: Path) -> None:
    aeng = make_engine(ARCH, enable_lora=True, max_loras=2, max_lora_rank=16, num_blocks=128,
                       served_model_name="tiny", lora_modules={"a": str(adapters["a"])})
    (tmp_path / "file").write_text("not a directory")

    async def body() -> None:
        async with serving(aeng, http_port=0, with_client=False) as (handle, _):
            url = f"http://127.0.0.1:{handle.http_port}"
            async with httpx.AsyncClient(base_url=url, timeout=60) as http:
                b = str(adapters["b"])
                bad_loads: list[tuple[Any, int, str, str, str]] = [
                    ({}, 400, "lora_name", "", "required"),
                    ({"lora_name": 5, "lora_path": b}, 400, "lora_name", "", "valid string"),
                    ({"lora_name": "b", "lora_path": [b]}, 400, "lora_path", "", "valid string"),
                    ({"lora_name": "b", "lora_path": b, "load_inplace": "yes"}, 400, "load_inplace", "", ""),
                    ({"lora_name": "b", "lora_path": str(tmp_path / "nowhere")}, 400, "lora_path",
                     "invalid_lora_adapter", "does not exist"),
                    ({"lora_name": "b", "lora_path": str(tmp_path / "file")}, 400, "lora_path",
                     "invalid_lora_adapter", "is a file, not a directory"),
                    ({"lora_name": "b", "lora_path": str(tmp_path)}, 400, "lora_path", "invalid_lora_adapter",
                     "adapter_config.json"),
                    ({"lora_name": "b", "lora_path": str(adapters["other_arch"])}, 400, "lora_path",
                     "invalid_lora_adapter", "different model"),
                    # Paths the OS itself refuses (the HTTP fuzz found the NUL byte as a 500).
                    ({"lora_name": "b", "lora_path": b + "\x00x"}, 400, "lora_path", "invalid_lora_adapter",
                     "NUL byte"),
                    ({"lora_name": "b", "lora_path": "x" * 5000}, 400, "lora_path", "invalid_lora_adapter",
                     "name too long"),
                    ({"lora_name": "b", "lora_path": str(adapters["rank32"])}, 400, "lora_path",
                     "invalid_lora_adapter", "max_lora_rank"),
                    # The base model's names: an adapter under one would never be reached.
                    ({"lora_name": "tiny", "lora_path": b}, 409, "lora_name", "lora_name_taken", "base model"),
                    ({"lora_name": str(tiny_model_cached(ARCH)), "lora_path": b}, 409, "lora_name",
                     "lora_name_taken", "base model"),
                    # Loaded already: replacing needs load_inplace, never by accident.
                    ({"lora_name": "a", "lora_path": b}, 409, "lora_name", "lora_name_taken", "load_inplace"),
                    ({"lora_name": " b", "lora_path": b}, 400, "lora_name", "invalid_lora_name", "whitespace"),
                    ({"lora_name": "b\n", "lora_path": b}, 400, "lora_name", "invalid_lora_name", "whitespace"),
                    ({"lora_name": "b\x00c", "lora_path": b}, 400, "lora_name", "invalid_lora_name", "control"),
                    ({"lora_name": "b\u200bc", "lora_path": b}, 400, "lora_name", "invalid_lora_name", "control"),
                    ({"lora_name": "b" * 300, "lora_path": b}, 400, "lora_name", "invalid_lora_name", "limit"),
                ]
                for request, status, param, code, says in bad_loads:
                    assert_error(await http.post(LOAD, json=request), status, param, code or None, says)
                r = await http.post(LOAD, content=b"[1, 2]", headers={"content-type": "application/json"})
                assert r.status_code == 400
                for request, status, param, code, says in [
                        ({}, 400, "lora_name", "", "required"),
                        ({"lora_name": "zzz"}, 404, "lora_name", "model_not_found", "zzz"),
                        ({"lora_name": "a", "drain": "yes"}, 400, "drain", "", "")]:
                    assert_error(await http.post(UNLOAD, json=request), status, param, code or None, says)

                # Nothing above was bound; a name with a slash (a hub-style id) is fine.
                r = await http.post(LOAD, json={"lora_name": "org/b", "lora_path": b})
                assert r.status_code == 200, r.text
                models = (await http.get("/v1/models")).json()["data"]
                assert [(m["id"], m["parent"]) for m in models] == [("tiny", None), ("a", "tiny"), ("org/b", "tiny")]
                assert (await http.get("/v1/models/org/b")).json()["parent"] == "tiny"

            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
            got = {}
            for model in ("tiny", "a", "org/b"):
                out = await client.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=1,
                                                      extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
                got[model] = completion_token_ids(out.model_dump())
            assert got["tiny"] == _reference(None)
            assert got["a"] == _reference(adapters["a"])
            assert got["org/b"] == _reference(adapters["b"])
            assert len({tuple(t) for t in got.values()}) == 3
            for call in (client.completions.create(model="zzz", prompt="hi", max_tokens=2),
                         client.chat.completions.create(model="zzz", messages=[{"role": "user", "content": "hi"}],
                                                        max_tokens=2)):
                with pytest.raises(openai.NotFoundError) as err:
                    await call
                assert err.value.body["param"] == "model" and err.value.body["code"] == "model_not_found"
        await wait_idle_and_clean(aeng)

    run_and_shutdown(aeng, body())


def test_grpc_adapter_rpcs_bad_input(adapters: dict[str, Path], tmp_path: Path) -> None:
    aeng = make_engine(ARCH, enable_lora=True, max_loras=1, max_lora_rank=16, num_blocks=128,
                       served_model_name="tiny", lora_modules={"a": str(adapters["a"])})

    async def body() -> None:
        async with serving(aeng) as (_, client):
            b = str(adapters["b"])
            for name, path, code, says in [
                    ("", b, grpc.StatusCode.INVALID_ARGUMENT, "name"),
                    ("b", "", grpc.StatusCode.INVALID_ARGUMENT, "path"),
                    ("b", str(tmp_path / "nowhere"), grpc.StatusCode.INVALID_ARGUMENT, "does not exist"),
                    ("b", str(adapters["rank32"]), grpc.StatusCode.INVALID_ARGUMENT, "max_lora_rank"),
                    ("b", str(adapters["other_arch"]), grpc.StatusCode.INVALID_ARGUMENT, "different model"),
                    ("b", b + "\x00x", grpc.StatusCode.INVALID_ARGUMENT, "NUL byte"),
                    ("b", "x" * 5000, grpc.StatusCode.INVALID_ARGUMENT, "name too long"),
                    ("tiny", b, grpc.StatusCode.ALREADY_EXISTS, "base model"),
                    ("a", b, grpc.StatusCode.ALREADY_EXISTS, "replace"),
                    ("b\t", b, grpc.StatusCode.INVALID_ARGUMENT, "whitespace")]:
                got, msg = await rpc_status(client.load_adapter(name, path))
                assert got == code and says in msg, (name, got, msg)
            got, msg = await rpc_status(client.unload_adapter(""))
            assert got == grpc.StatusCode.INVALID_ARGUMENT and "name" in msg
            got, msg = await rpc_status(client.unload_adapter("zzz"))
            assert got == grpc.StatusCode.NOT_FOUND and "zzz" in msg
            assert list((await client.list_models())[0].adapters) == ["a"]
            got, msg = await rpc_status(client.create_session([SYSTEM], adapter="zzz"))
            assert got == grpc.StatusCode.NOT_FOUND and "zzz" in msg
            got, msg = await rpc_status(client.generate_done(prompt_token_ids=PROMPT, adapter="zzz", max_tokens=2))
            assert got == grpc.StatusCode.NOT_FOUND and "zzz" in msg

            # replace=True swaps the weights: a new generation, no KV of the old weights reused.
            greedy: dict[str, Any] = dict(temperature=0.0, max_tokens=6, ignore_eos=True)
            done = await client.generate_done(prompt_token_ids=PROMPT, adapter="a", **greedy)
            assert list(done.token_ids) == _reference(adapters["a"])
            await client.load_adapter("a", b, replace=True)
            done = await client.generate_done(prompt_token_ids=PROMPT, adapter="a", **greedy)
            assert list(done.token_ids) == _reference(adapters["b"])
        await wait_idle_and_clean(aeng)

    run_and_shutdown(aeng, body())


def test_reload_while_session_open_never_reuses_stale_kv(adapters: dict[str, Path]) -> None:
    """A session on "a" blocks replacing it (409 / FAILED_PRECONDITION, naming the session); after a
    drained unload and a reload with other weights, the session keeps a's weights on every turn while
    new requests under the name get the new weights, with no prefix-cache hit on the old ones."""
    aeng = make_engine(ARCH, enable_lora=True, max_loras=1, max_lora_rank=16, num_blocks=128,
                       served_model_name="tiny", lora_modules={"a": str(adapters["a"])})
    greedy: dict[str, Any] = dict(temperature=0.0, max_tokens=6, ignore_eos=True, return_token_ids=True)

    async def body() -> None:
        async with serving(aeng, http_port=0) as (handle, client):
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{handle.http_port}", timeout=60) as http:
                first = (await http.post("/v1/completions", json=greedy_body("a", PROMPT, 6))).json()
                assert completion_token_ids(first) == _reference(adapters["a"])
                session = await client.create_session([SYSTEM], adapter="a")
                turn = await session.run_turn([{"role": "user", "content": "Hello."}], **greedy)
                assert turn.token_ids == _reference(adapters["a"], list(turn.done.prompt_token_ids))
                swap = {"lora_name": "a", "lora_path": str(adapters["b"]), "load_inplace": True}
                assert_error(await http.post(LOAD, json=swap), 409, "lora_name", "adapter_in_use",
                             session.info.session_id)
                code, msg = await rpc_status(client.load_adapter("a", str(adapters["b"]), replace=True))
                assert code == grpc.StatusCode.FAILED_PRECONDITION and session.info.session_id in msg

                assert (await http.post(UNLOAD, json={"lora_name": "a", "drain": True})).status_code == 200
                r = await http.post(LOAD, json={"lora_name": "a", "lora_path": str(adapters["b"])})
                assert r.status_code == 200, r.text
                again = (await http.post("/v1/completions", json=greedy_body("a", PROMPT, 6))).json()
                assert completion_token_ids(again) == _reference(adapters["b"])
                assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
                turn = await session.run_turn([{"role": "user", "content": "Still a?"}], **greedy)
                assert turn.token_ids == _reference(adapters["a"], list(turn.done.prompt_token_ids))
                await session.close()
        await wait_idle_and_clean(aeng)

    run_and_shutdown(aeng, body())


def test_drained_adapter_with_its_directory_gone_fails_alone(adapters: dict[str, Path], tmp_path: Path) -> None:
    """The session's adapter was unloaded with drain and its directory removed; another adapter then
    took the only slot. The session's next turn fails with the reason; base-model requests sent with
    it complete with the right tokens; the session's pages stay consistent and are freed on close."""
    copy = tmp_path / "a-copy"
    shutil.copytree(adapters["a"], copy)
    aeng = make_engine(ARCH, enable_lora=True, max_loras=1, max_lora_rank=16, num_blocks=128,
                       lora_modules={"a": str(copy), "b": str(adapters["b"])})
    greedy: dict[str, Any] = dict(temperature=0.0, max_tokens=4, ignore_eos=True)

    async def body() -> None:
        async with serving(aeng) as (_, client):
            session = await client.create_session([SYSTEM], adapter="a")
            await session.run_turn([{"role": "user", "content": "hi"}], **greedy)
            await client.unload_adapter("a", drain=True)
            shutil.rmtree(copy)
            await client.generate_done(prompt_token_ids=[5, 6, 7], adapter="b", **greedy)  # takes the slot
            prompts = [[9, 8, 7, 6], list(range(40, 60))]
            results = await asyncio.gather(
                rpc_status(session.run_turn([{"role": "user", "content": "again"}], **greedy)),
                *(client.generate_done(prompt_token_ids=p, **greedy) for p in prompts))
            code, msg = results[0]
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, msg)
            assert "LoRA adapter 'a'" in msg and "does not exist" in msg and "internal error" not in msg
            for prompt, done in zip(prompts, results[1:]):
                assert list(done.token_ids) == _reference(None, prompt, 4)
            await session.close()
        await wait_idle_and_clean(aeng)

    run_and_shutdown(aeng, body())


def test_lora_endpoints_without_lora(adapters: dict[str, Path]) -> None:
    aeng = make_engine(ARCH, num_blocks=64, served_model_name="tiny")

    async def body() -> None:
        async with serving(aeng, http_port=0, with_client=False) as (handle, _):
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{handle.http_port}", timeout=60) as http:
                r = await http.post(LOAD, json={"lora_name": "a", "lora_path": str(adapters["a"])})
                assert_error(r, 404, None, "lora_not_enabled", "--enable-lora")
                # Without LoRA that is the answer, whatever else is wrong with the request.
                r = await http.post(LOAD, json={"lora_name": "tiny", "lora_path": str(adapters["a"])})
                assert_error(r, 404, None, "lora_not_enabled", "--enable-lora")
                assert_error(await http.post(UNLOAD, json={"lora_name": "a"}), 404, None, "lora_not_enabled")
                r = await http.post("/v1/completions", json={"model": "a", "prompt": "hi", "max_tokens": 2})
                assert_error(r, 404, "model", "model_not_found", "`a`")
                assert [m["id"] for m in (await http.get("/v1/models")).json()["data"]] == ["tiny"]

    run_and_shutdown(aeng, body())
