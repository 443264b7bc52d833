"""LoRA adapters changing under the OpenAI endpoints.

- A name unloaded between the check of a request's `model` and the request's admission (a load /
  unload racing with requests) is a 404 naming the adapter on every endpoint, streamed or not, never
  a 500; requests of other adapters and of the base model beside it are served as usual.
- A Responses `previous_response_id` continuation names its model on every request, so it must run
  on the weights that name has now. When the adapter was reloaded with other weights since the
  earlier response (drained, loaded again), the continuation may not go on on the earlier
  response's session, whose KV was computed under the old weights: it starts a new session from the
  conversation, as it does for a change of adapter, instructions or tools."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Optional

import httpx
import pytest

from agentserve.adapters.openai.serving import OpenAIServing
from agentserve.testing import tiny_model_cached
from conftest_grpc import encode, make_engine, render, run_and_shutdown, serving
from helpers.api_edges import assert_error, completion_token_ids, greedy_body, wait_idle_and_clean
from helpers.lora import ALL_MODULES, build_peft_adapter, peft_greedy

ARCH = "qwen2"
NEW_TOKENS = 6


def _request(text: str, previous: Optional[str] = None) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "x", "input": text, "max_output_tokens": NEW_TOKENS, "temperature": 0,
                            "ignore_eos": True}
    if previous is not None:
        body["previous_response_id"] = previous
    return body


def _text(response: dict[str, Any]) -> str:
    return str(response["output"][0]["content"][0]["text"])


def test_continuation_after_a_reload_runs_on_the_new_weights(tmp_path: Path) -> None:
    base = tiny_model_cached(ARCH)
    # Large B scales: the two adapters' greedy tokens differ from each other's.
    old = build_peft_adapter(base, tmp_path / "old", seed=21, r=8, lora_alpha=16, scale=30.0,
                             target_modules=list(ALL_MODULES))
    new = build_peft_adapter(base, tmp_path / "new", seed=22, r=8, lora_alpha=16, scale=30.0,
                             target_modules=["q_proj", "v_proj", "down_proj"])
    live = tmp_path / "live"  # a trainer's output_dir: the next checkpoint is saved over the first
    shutil.copytree(old, live)
    aeng = make_engine(ARCH, enable_lora=True, max_loras=1, max_lora_rank=16, num_blocks=256,
                       served_model_name="tiny", lora_modules={"x": str(live)})
    tokenizer = aeng.engine.tokenizer

    def expected(adapter: Path, messages: list[dict[str, Any]]) -> str:
        prompt = encode(ARCH, render(ARCH, messages))
        return str(tokenizer.decode(peft_greedy(base, adapter, [prompt], NEW_TOKENS)[0])).rstrip("\ufffd")

    async def body() -> None:
        async with serving(aeng, http_port=0, with_client=False) as (handle, _):
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{handle.http_port}", timeout=60) as http:
                first = (await http.post("/v1/responses", json=_request("Hello there"))).json()
                conversation = [{"role": "user", "content": "Hello there"}]
                assert _text(first) == expected(old, conversation)
                r = await http.post("/v1/unload_lora_adapter", json={"lora_name": "x", "drain": True})
                assert r.status_code == 200, r.text
                shutil.rmtree(live)
                shutil.copytree(new, live)
                r = await http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(live)})
                assert r.status_code == 200, r.text

                r = await http.post("/v1/responses", json=_request("And then?", first["id"]))
                assert r.status_code == 200, r.text
                second = r.json()
                conversation += [{"role": "assistant", "content": _text(first)}, {"role": "user", "content": "And then?"}]
                want_new, want_old = expected(new, conversation), expected(old, conversation)
                assert want_new != want_old, "the adapters agree here: the comparison would prove nothing"
                assert _text(second) == want_new
                # None of the old weights' KV (the first response's session) was reused.
                assert second["usage"]["input_tokens_details"]["cached_tokens"] == 0
                for response in (second, first):
                    assert (await http.delete(f"/v1/responses/{response['id']}")).status_code == 200
        await wait_idle_and_clean(aeng)  # the deletes closed both sessions: every page is free

    run_and_shutdown(aeng, body())


def test_an_adapter_unloaded_after_the_model_check_is_a_404_naming_it(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The race made certain: the endpoints' model check sees "gone" as loaded, the engine does not
    (as when an unload lands between the two)."""
    base = tiny_model_cached(ARCH)
    adapter = build_peft_adapter(base, tmp_path / "a", seed=23, r=8, lora_alpha=16, scale=30.0,
                                 target_modules=list(ALL_MODULES))
    aeng = make_engine(ARCH, enable_lora=True, max_loras=1, max_lora_rank=16, num_blocks=256,
                       served_model_name="tiny", lora_modules={"a": str(adapter)})
    real = OpenAIServing.adapter_names
    monkeypatch.setattr(OpenAIServing, "adapter_names", lambda self: [*real(self), "gone"])
    prompt = list(range(7, 30))
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    requests: list[tuple[str, dict[str, Any]]] = [
        ("/v1/completions", {"model": "gone", "prompt": prompt, "max_tokens": 2}),
        ("/v1/completions", {"model": "gone", "prompt": prompt, "max_tokens": 2, "stream": True}),
        ("/v1/chat/completions", {"model": "gone", **chat}),
        ("/v1/chat/completions", {"model": "gone", **chat, "stream": True}),
        ("/v1/responses", {"model": "gone", "input": "hi", "max_output_tokens": 2}),
        ("/v1/responses", {"model": "gone", "input": "hi", "max_output_tokens": 2, "stream": True})]

    async def body() -> None:
        async with serving(aeng, http_port=0, with_client=False) as (handle, _):
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{handle.http_port}", timeout=60) as http:
                for path, request in requests:
                    r = await http.post(path, json=request)
                    assert_error(r, 404, "model", "model_not_found", "'gone'")
                # vLLM's model card of an adapter: its root is the directory it was loaded from.
                cards = {m["id"]: m for m in (await http.get("/v1/models")).json()["data"]}
                assert (cards["a"]["root"], cards["a"]["parent"]) == (str(adapter), "tiny")
                for model, weights in (("a", adapter), ("tiny", None)):
                    r = await http.post("/v1/completions", json=greedy_body(model, prompt, 6))
                    assert r.status_code == 200, r.text
                    assert completion_token_ids(r.json()) == peft_greedy(base, weights, [prompt], 6)[0]
        await wait_idle_and_clean(aeng)

    run_and_shutdown(aeng, body())


def test_stored_responses_do_not_hold_their_adapter(tmp_path: Path) -> None:
    """A stored response (OpenAI's default, store: true) keeps its session for continuations until the TTL;
    that session is no client's open session: unloading or replacing its adapter without drain is not
    refused over it (it was a 409 naming an internal session id for the TTL's 30 minutes). The response
    stays retrievable, and a continuation naming the unloaded adapter is a 404 naming `model`."""
    base = tiny_model_cached(ARCH)
    first_weights = build_peft_adapter(base, tmp_path / "first", seed=23, r=8, lora_alpha=16, scale=30.0,
                                       target_modules=list(ALL_MODULES))
    other_weights = build_peft_adapter(base, tmp_path / "other", seed=24, r=8, lora_alpha=16, scale=30.0,
                                       target_modules=["q_proj", "v_proj"])
    aeng = make_engine(ARCH, enable_lora=True, max_loras=1, max_lora_rank=16, num_blocks=256,
                       served_model_name="tiny", lora_modules={"x": str(first_weights)})

    async def body() -> None:
        async with serving(aeng, http_port=0, with_client=False) as (handle, _):
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{handle.http_port}", timeout=60) as http:
                r = await http.post("/v1/responses", json=_request("Hello there"))
                assert r.status_code == 200, r.text
                first = r.json()
                # Replaced in place under the stored response: a new generation, no drain needed.
                r = await http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(other_weights),
                                                                   "load_inplace": True})
                assert r.status_code == 200, r.text
                r = await http.post("/v1/responses", json=_request("Hi", first["id"]))
                assert r.status_code == 200, r.text
                second = r.json()
                r = await http.post("/v1/unload_lora_adapter", json={"lora_name": "x"})
                assert r.status_code == 200, r.text
                assert (await http.get(f"/v1/responses/{second['id']}")).json()["id"] == second["id"]
                r = await http.post("/v1/responses", json=_request("And then?", second["id"]))
                assert_error(r, 404, "model", "model_not_found", says="`x`")
                for response in (second, first):
                    assert (await http.delete(f"/v1/responses/{response['id']}")).status_code == 200
        await wait_idle_and_clean(aeng)

    run_and_shutdown(aeng, body())
