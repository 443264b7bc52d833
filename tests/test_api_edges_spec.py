"""The serving edge with speculative decoding (n-gram and a draft model) and multi-LoRA on: n > 1,
logprobs, stop strings, json_schema and tools with tool_choice "required" keep their contracts; greedy
tokens equal PEFT's merged model; a client that disconnects mid-stream leaks nothing; in a mixed
batch, requests with an unknown adapter or a schema that does not compile fail alone (with the field
named) while the good ones, and adapter loads / unloads racing with them, complete exactly."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from agentserve.testing import tiny_model_cached
from conftest_grpc import TOOLS, make_engine, run_and_shutdown, serving
from helpers.api_edges import assert_error, completion_token_ids, greedy_body, wait_idle_and_clean
from helpers.lora import ALL_MODULES, build_peft_adapter, peft_greedy
from helpers.spec_models import noisy_draft

ARCH = "qwen2"
# Repeats: the n-gram proposer finds matches, so speculation really runs.
PROMPT = [5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7]
MESSAGES = [{"role": "user", "content": "one two three one two three one two"}]
SCHEMA = {"type": "object", "properties": {"k": {"type": "integer"}}, "required": ["k"]}
# spec_dynamic off: its cost model may choose k = 0 on the CPU, and these tests are about speculating.
SPECS: dict[str, dict[str, Any]] = {"ngram": dict(speculative_method="ngram", prompt_lookup_min=1, spec_dynamic=False),
                                    "draft": dict(num_speculative_tokens=3, spec_dynamic=False)}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tiny_model_cached(ARCH)
    root = tmp_path_factory.mktemp("spec-edge-peft")
    return {"a": build_peft_adapter(base, root / "a", seed=11, r=8, lora_alpha=16, scale=30.0,
                                    target_modules=list(ALL_MODULES)),
            "b": build_peft_adapter(base, root / "b", seed=12, r=16, lora_alpha=16, scale=30.0,
                                    target_modules=["q_proj", "v_proj", "down_proj"])}


def _engine(kind: str, adapters: dict[str, Path]) -> Any:
    spec = dict(SPECS[kind], draft_model=noisy_draft(ARCH)) if kind == "draft" else SPECS[kind]
    return make_engine(ARCH, enable_lora=True, max_loras=1, max_lora_rank=16, num_blocks=128, served_model_name="tiny",
                       lora_modules={"a": str(adapters["a"]), "b": str(adapters["b"])}, **spec)


def _reference(adapter: Path | None, prompt: list[int] = PROMPT, n: int = 8) -> list[int]:
    return peft_greedy(tiny_model_cached(ARCH), adapter, [prompt], n)[0]


@pytest.mark.parametrize("kind", ["ngram", "draft"])
def test_request_features_under_speculation(kind: str, adapters: dict[str, Path]) -> None:
    aeng = _engine(kind, adapters)

    async def body() -> None:
        async with serving(aeng, http_port=0, with_client=False) as (handle, _):
            url = f"http://127.0.0.1:{handle.http_port}"
            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
            async with httpx.AsyncClient(base_url=url, timeout=120) as http:
                for model, adapter in (("a", adapters["a"]), ("tiny", None)):
                    out = (await http.post("/v1/completions", json=greedy_body(model, PROMPT, 8))).json()
                    assert completion_token_ids(out) == _reference(adapter), model
                    assert len(out["choices"][0]["logprobs"]["token_logprobs"]) == 8

            many = await client.chat.completions.create(model="a", messages=MESSAGES, n=3, max_tokens=6,
                                                        temperature=0.8, seed=1)
            assert sorted(c.index for c in many.choices) == [0, 1, 2] and many.usage.completion_tokens == 18
            lp = await client.chat.completions.create(model="b", messages=MESSAGES, max_tokens=6, temperature=0,
                                                      logprobs=True, top_logprobs=3)
            content = lp.choices[0].logprobs.content
            assert len(content) == 6 and all(len(t.top_logprobs) == 3 for t in content)
            assert all(t.logprob == max(x.logprob for x in t.top_logprobs) for t in content)  # greedy: the top one

            free = await client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0)
            stop = free.choices[0].text[3:5]  # a stop string the unconstrained text reaches mid-way
            stopped = await client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0,
                                                      stop=[stop])
            assert stopped.choices[0].finish_reason == "stop" and stop not in stopped.choices[0].text
            assert free.choices[0].text.startswith(stopped.choices[0].text)

            schema = await client.chat.completions.create(
                model="b", messages=MESSAGES, max_tokens=40, temperature=0,
                response_format={"type": "json_schema", "json_schema": {"name": "k", "schema": SCHEMA}})
            text = schema.choices[0].message.content or ""
            if schema.choices[0].finish_reason == "stop":
                jsonschema.validate(json.loads(text), SCHEMA)
            else:  # cut by max_tokens: still a prefix of a valid object
                assert text.startswith('{"k":') or text.startswith('{ "k"'), text
            tools = await client.chat.completions.create(model="a", messages=MESSAGES, max_tokens=60, temperature=0,
                                                         tools=TOOLS, tool_choice="required")
            calls = tools.choices[0].message.tool_calls or []
            assert calls and calls[0].function.name in {t["function"]["name"] for t in TOOLS}
        await wait_idle_and_clean(aeng)
        assert aeng.engine.metrics.spec_num_draft_tokens > 0  # the features above did run speculatively

    run_and_shutdown(aeng, body(), timeout=400)


def test_disconnect_mid_stream_under_speculation_leaks_nothing(adapters: dict[str, Path]) -> None:
    aeng = _engine("ngram", adapters)

    async def body() -> None:
        async with serving(aeng, http_port=0, with_client=False) as (handle, _):
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{handle.http_port}", timeout=60) as http:
                for model in ("a", "tiny"):
                    request = {"model": model, "prompt": PROMPT, "max_tokens": 400, "stream": True,
                               "ignore_eos": True, "n": 2}
                    async with http.stream("POST", "/v1/completions", json=request) as r:
                        lines = 0
                        async for line in r.aiter_lines():
                            lines += bool(line)
                            if lines >= 3:
                                break
                    await wait_idle_and_clean(aeng)
                metrics = aeng.engine.lora.adapters_in_use()
                assert metrics == ([], [])
                # Nothing holds "a" any more: it unloads without drain.
                assert (await http.post("/v1/unload_lora_adapter", json={"lora_name": "a"})).status_code == 200

    run_and_shutdown(aeng, body())


def test_mixed_batch_bad_requests_and_adapter_churn_fail_alone(adapters: dict[str, Path]) -> None:
    aeng = _engine("ngram", adapters)
    bad_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"k": {"type": "string", "pattern": "("}}}}}

    async def body() -> None:
        async with serving(aeng, http_port=0, with_client=False) as (handle, _):
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{handle.http_port}", timeout=120) as http:
                async def churn() -> None:  # loads and unloads another name while the batch runs
                    for _ in range(3):
                        r = await http.post("/v1/load_lora_adapter", json={"lora_name": "c", "lora_path": str(adapters["b"])})
                        assert r.status_code == 200, r.text
                        r = await http.post("/v1/unload_lora_adapter", json={"lora_name": "c", "drain": True})
                        assert r.status_code == 200, r.text

                good = [("a", adapters["a"]), ("b", adapters["b"]), ("tiny", None)] * 2
                results = await asyncio.gather(
                    *(http.post("/v1/completions", json=greedy_body(m, PROMPT, 8)) for m, _ in good),
                    http.post("/v1/completions", json=greedy_body("zzz", PROMPT, 8)),
                    http.post("/v1/chat/completions", json={"model": "a", "messages": MESSAGES, "max_tokens": 5,
                                                            "response_format": bad_schema}),
                    http.post("/v1/chat/completions", json={"model": "a", "messages": MESSAGES, "max_tokens": 5,
                                                            "stream": True, "response_format": bad_schema}),
                    churn())
                for (model, adapter), r in zip(good, results):
                    assert r.status_code == 200, r.text
                    assert completion_token_ids(r.json()) == _reference(adapter), model
                assert_error(results[len(good)], 404, "model", "model_not_found", "zzz")
                for r in results[len(good) + 1:len(good) + 3]:
                    message = assert_error(r, 400, "response_format.json_schema.schema", None, "could not be compiled")
                    assert "zzz" not in message and "cmpl-" not in message  # its own data only
                assert [m["id"] for m in (await http.get("/v1/models")).json()["data"]] == ["tiny", "a", "b"]
        await wait_idle_and_clean(aeng)
        assert aeng.engine.lora.adapters_in_use() == ([], [])

    run_and_shutdown(aeng, body())
