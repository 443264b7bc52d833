"""The OpenAI-compatible HTTP API against a live server on loopback, through the official `openai`
client: completions and chat completions, streaming and not, n > 1, logprobs, stop, seeds, usage
with cached tokens, vLLM's extra fields, /v1/models, /health and /metrics."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Iterator

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agentserve.adapters.openai.app import create_app
from agentserve.adapters.openai.metrics import parse_metrics
from agentserve.adapters.openai.server import ServerThread
from agentserve.config import EngineConfig
from agentserve.engine.async_engine import AsyncEngine
from agentserve.engine.engine import Engine
from agentserve.testing.tiny import tiny_model_cached

MODEL = "tiny-qwen2"
MESSAGES = [{"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "Name three colors of the rainbow."}]


class Live:
    def __init__(self, aeng: AsyncEngine, server: ServerThread, config: EngineConfig) -> None:
        self.aeng, self.server, self.config = aeng, server, config
        self.client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        self.http = httpx.Client(base_url=server.url, timeout=60)

    def run(self, fn: Any) -> Any:
        return self.aeng.call_soon(fn).result(timeout=30)

    def wait_idle(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while self.run(self.aeng.engine.has_unfinished):
            assert time.monotonic() < deadline, "the engine did not become idle"
            time.sleep(0.02)


@pytest.fixture(scope="module")
def live() -> Iterator[Live]:
    path = tiny_model_cached("qwen2")
    config = EngineConfig.from_kwargs(str(path), device="cpu", num_blocks=1024, served_model_name=MODEL,
                                      max_model_len=1024)
    aeng = AsyncEngine(Engine(config))
    server = ServerThread(create_app(aeng, config)).start()
    yield Live(aeng, server, config)
    server.stop()
    aeng.shutdown()


def _stream_text(stream: Any) -> tuple[dict[int, str], dict[int, str], list[Any]]:
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    chunks = list(stream)
    for ch in chunks:
        for c in ch.choices:
            delta = getattr(c, "delta", None)
            piece = (delta.content if delta is not None else c.text) or ""
            texts[c.index] = texts.get(c.index, "") + piece
            if c.finish_reason is not None:
                reasons[c.index] = c.finish_reason
    return texts, reasons, chunks


# --- models, health -----------------------------------------------------------------------------------


def test_models_and_health(live: Live) -> None:
    models = live.client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert live.client.models.retrieve(MODEL).id == MODEL
    assert live.http.get("/health").status_code == 200
    # The model path names the same model.
    out = live.client.completions.create(model=live.config.model.model, prompt="Hello", max_tokens=2)
    assert out.model == live.config.model.model and len(out.choices) == 1


# --- completions --------------------------------------------------------------------------------------


def test_completion_greedy_stream_equals_whole(live: Live) -> None:
    kw = dict(model=MODEL, prompt="The quick brown fox", max_tokens=24, temperature=0)
    whole = live.client.completions.create(**kw)
    texts, reasons, _ = _stream_text(live.client.completions.create(stream=True, **kw))
    assert whole.object == "text_completion" and whole.id.startswith("cmpl-")
    assert texts[0] == whole.choices[0].text and whole.choices[0].text
    assert reasons[0] == whole.choices[0].finish_reason
    n_prompt = len(live.aeng.engine.tokenizer.encode("The quick brown fox"))
    assert whole.usage.prompt_tokens == n_prompt
    assert whole.usage.total_tokens == n_prompt + whole.usage.completion_tokens
    if whole.choices[0].finish_reason == "length":
        assert whole.usage.completion_tokens == 24


def test_completion_prompt_forms_echo_and_n(live: Live) -> None:
    ids = live.aeng.engine.tokenizer.encode("Once upon a time")
    a = live.client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0)
    b = live.client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    assert a.choices[0].text == b.choices[0].text
    echo = live.client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0,
                                          echo=True)
    assert echo.choices[0].text == "Once upon a time" + a.choices[0].text
    # Several prompts x n: choices indexed prompt * n + i, usage summed.
    many = live.client.completions.create(model=MODEL, prompt=["Once upon a time", "In the beginning"], n=2,
                                          max_tokens=5, temperature=0.8, seed=3)
    assert sorted(c.index for c in many.choices) == [0, 1, 2, 3]
    tok = live.aeng.engine.tokenizer
    assert many.usage.prompt_tokens == len(tok.encode("Once upon a time")) + len(tok.encode("In the beginning"))
    assert 4 <= many.usage.completion_tokens <= 4 * 5
    texts, _, _ = _stream_text(live.client.completions.create(
        model=MODEL, prompt=["Once upon a time", "In the beginning"], n=2, max_tokens=5, temperature=0.8, seed=3,
        stream=True))
    assert texts == {c.index: c.text for c in many.choices}


def test_completion_logprobs(live: Live) -> None:
    out = live.client.completions.create(model=MODEL, prompt="Hello there", max_tokens=8, temperature=0,
                                         logprobs=3)
    lp = out.choices[0].logprobs
    n = out.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert value <= 0
        assert 3 <= len(top) <= 4 and token in top
        assert value == pytest.approx(max(top.values()), abs=1e-5)  # greedy takes the argmax
    assert lp.text_offset == sorted(lp.text_offset)
    # Streamed logprobs cover the same tokens.
    chunks = list(live.client.completions.create(model=MODEL, prompt="Hello there", max_tokens=8, temperature=0,
                                                 logprobs=3, stream=True))
    streamed = [v for ch in chunks for c in ch.choices if c.logprobs for v in c.logprobs.token_logprobs]
    assert streamed == pytest.approx(lp.token_logprobs, abs=1e-5)


def test_logit_bias_forces_and_bans_tokens(live: Live) -> None:
    """(Bans, and exactness under speculation: tests/test_logit_bias.py.)"""
    tok = live.aeng.engine.tokenizer
    kw: dict[str, Any] = dict(model=MODEL, prompt="Hello there", max_tokens=5, temperature=0)
    plain = live.client.completions.create(**kw)
    forced = live.client.completions.create(logit_bias={"42": 100}, **kw)
    assert forced.choices[0].text == tok.decode([42] * 5) != plain.choices[0].text
    chat = live.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=3, temperature=0, logit_bias={"42": 100})
    assert chat.choices[0].message.content == tok.decode([42] * 3)
    allowed = live.client.completions.create(extra_body={"allowed_token_ids": [42, 43]}, logprobs=0, **kw)
    lp = allowed.choices[0].logprobs
    assert lp is not None and len(lp.tokens) == 5 and set(lp.tokens) <= {tok.decode([42]), tok.decode([43])}
    with pytest.raises(openai.BadRequestError, match="allowed_token_ids"):
        live.client.completions.create(extra_body={"allowed_token_ids": [10**8]}, **kw)
    word = tok.decode([plain.choices[0].text and tok.encode(plain.choices[0].text, add_special_tokens=False)[0]]).strip()
    avoided = live.client.completions.create(extra_body={"bad_words": [word]}, **kw)
    assert word and word not in avoided.choices[0].text.split()
    with pytest.raises(openai.BadRequestError, match="bad_words"):
        live.client.completions.create(extra_body={"bad_words": [""]}, **kw)


def test_version_and_ping(live: Live) -> None:
    import agentserve

    assert live.http.get("/version").json() == {"version": agentserve.__version__}
    assert live.http.get("/ping").status_code == live.http.post("/ping").status_code == 200


def test_tokenize_and_detokenize(live: Live) -> None:
    tok = live.aeng.engine.tokenizer
    text = "Once upon a time"
    r = live.http.post("/tokenize", json={"model": MODEL, "prompt": text, "return_token_strs": True}).json()
    assert r["tokens"] == tok.encode(text, add_special_tokens=True) and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == 1024 and r["token_strs"] == tok.convert_ids_to_tokens(r["tokens"])
    plain = live.http.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
    assert live.http.post("/detokenize", json={"tokens": plain["tokens"]}).json() == {"prompt": text}
    # The messages form counts the prompt a chat completion gets.
    chat = live.http.post("/tokenize", json={"model": MODEL, "messages": MESSAGES}).json()
    done = live.client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1, temperature=0)
    assert chat["count"] == done.usage.prompt_tokens > 0
    # vLLM's TokenizeChatRequest takes add_special_tokens (as chat completions do) and ignores unknown fields.
    special = live.http.post("/tokenize", json={"messages": MESSAGES, "add_special_tokens": True, "extra": 1}).json()
    done = live.client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1, temperature=0,
                                               extra_body={"add_special_tokens": True})
    assert special["count"] == done.usage.prompt_tokens
    assert live.http.post("/detokenize", json={"tokens": plain["tokens"], "extra": 1}).json() == {"prompt": text}
    for path, body, status, param in (
            ("/tokenize", {"prompt": "a", "messages": MESSAGES}, 400, "prompt"),
            ("/tokenize", {}, 400, "prompt"),
            ("/tokenize", {"messages": MESSAGES, "chat_template": "{{ 1 }}"}, 400, "chat_template"),
            ("/tokenize", {"prompt": "a", "model": "no-such-model"}, 404, "model"),
            ("/detokenize", {"tokens": [-1, 5]}, 400, "tokens")):
        r = live.http.post(path, json=body)
        assert r.status_code == status, (path, body, r.text)
        assert r.json()["error"]["param"] == param, r.json()


# --- chat ---------------------------------------------------------------------------------------------


def test_chat_greedy_stream_equals_whole_with_usage(live: Live) -> None:
    kw = dict(model=MODEL, messages=MESSAGES, max_tokens=32, temperature=0)
    whole = live.client.chat.completions.create(**kw)
    assert whole.object == "chat.completion" and whole.id.startswith("chatcmpl-")
    msg = whole.choices[0].message
    assert msg.role == "assistant" and msg.content and not msg.tool_calls
    chunks = list(live.client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == msg.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert all(c.usage is None for c in chunks[:-1])
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert usage.prompt_tokens == whole.usage.prompt_tokens
    assert usage.completion_tokens == whole.usage.completion_tokens
    tok = live.aeng.engine.tokenizer
    rendered = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert whole.usage.prompt_tokens == len(tok.encode(rendered, add_special_tokens=False))


def test_chat_cached_tokens_reported(live: Live) -> None:
    long_system = "You are an agent. " + " ".join(f"Rule {i}: be precise about item {i}." for i in range(40))
    messages = [{"role": "system", "content": long_system}, {"role": "user", "content": "Go."}]
    first = live.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, temperature=0)
    second = live.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, temperature=0)
    block = live.config.cache.block_size
    assert first.usage.prompt_tokens > 4 * block
    assert first.usage.prompt_tokens_details.cached_tokens < first.usage.prompt_tokens
    cached = second.usage.prompt_tokens_details.cached_tokens
    # Every full page of the prompt but the last token's is found again.
    assert cached >= (first.usage.prompt_tokens - 1) // block * block - block and cached % block == 0 and cached > 0


def test_chat_n_and_seed_reproducible(live: Live) -> None:
    kw = dict(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=1.0, seed=1234)
    a = live.client.chat.completions.create(**kw)
    b = live.client.chat.completions.create(**kw)
    assert a.choices[0].message.content == b.choices[0].message.content
    others = {live.client.chat.completions.create(**{**kw, "seed": s}).choices[0].message.content for s in range(5)}
    assert len(others) > 1  # seeds matter
    many = live.client.chat.completions.create(n=3, **kw)
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert 3 <= many.usage.completion_tokens <= 3 * 12
    assert many.usage.prompt_tokens == a.usage.prompt_tokens  # the prompt counts once for all n
    texts, reasons, _ = _stream_text(live.client.chat.completions.create(n=3, stream=True, **kw))
    assert texts == {c.index: c.message.content for c in many.choices}
    assert reasons == {c.index: c.finish_reason for c in many.choices}


def test_chat_logprobs(live: Live) -> None:
    out = live.client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0,
                                              logprobs=True, top_logprobs=4)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 4
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert entry.logprob == pytest.approx(values[0], abs=1e-5)  # greedy: the top token
        if "\ufffd" not in entry.token:
            assert entry.bytes == list(entry.token.encode("utf-8"))
    # The tokens' bytes (including pieces of multi-byte characters) make up the text.
    raw = b"".join(bytes(e.bytes) for e in content)
    assert raw.decode("utf-8", errors="replace") == out.choices[0].message.content
    chunks = list(live.client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0,
                                                      logprobs=True, top_logprobs=4, stream=True))
    streamed = [e.logprob for ch in chunks for c in ch.choices if c.logprobs for e in c.logprobs.content]
    assert streamed == pytest.approx([e.logprob for e in content], abs=1e-5)
    plain = live.client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3, temperature=0)
    assert plain.choices[0].logprobs is None


def test_chat_stop_strings(live: Live) -> None:
    kw = dict(model=MODEL, messages=MESSAGES, temperature=0)
    full = live.client.chat.completions.create(max_tokens=40, extra_body={"ignore_eos": True}, **kw)
    text = full.choices[0].message.content
    assert len(text) > 12
    # A stop string taken from the middle of the greedy output cuts the text right before it.
    stop = text[8:12]
    cut = text[:text.index(stop)]
    out = live.client.chat.completions.create(max_tokens=40, stop=[stop, "\x00never"], **kw)
    assert out.choices[0].message.content == cut
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].model_extra["stop_reason"] == stop  # vLLM's extra: which stop matched
    texts, reasons, _ = _stream_text(live.client.chat.completions.create(max_tokens=40, stop=stop, stream=True, **kw))
    assert texts[0] == cut and reasons[0] == "stop"
    done = live.client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=30, temperature=0,
                                          extra_body={"ignore_eos": True})
    stop = done.choices[0].text[5:9]
    again = live.client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=30, temperature=0,
                                           stop=stop)
    assert again.choices[0].text == done.choices[0].text[:done.choices[0].text.index(stop)]
    assert again.choices[0].finish_reason == "stop"


def test_max_completion_tokens_and_extra_fields(live: Live) -> None:
    out = live.client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=20, max_completion_tokens=3, temperature=0.7, seed=1,
        presence_penalty=0.5, frequency_penalty=0.3, top_p=0.9,
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "ignore_eos": True,
                    "an_unknown_field": {"is": "ignored"}}, user="someone", metadata={"k": "v"}, store=False)
    assert out.usage.completion_tokens == 3 and out.choices[0].finish_reason == "length"
    comp = live.client.completions.create(model=MODEL, prompt="Hello", max_tokens=4,
                                          extra_body={"ignore_eos": True, "min_tokens": 4, "top_k": 5})
    assert comp.usage.completion_tokens == 4
    # Without max_tokens, chat generates up to the context limit (bounded here by ignore_eos=False + EOS
    # or the limit): the request is accepted.
    r = live.http.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, "temperature": 0,
                                                     "max_completion_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2


def test_stream_continuous_usage(live: Live) -> None:
    r = live.http.post("/v1/chat/completions", json={
        "model": MODEL, "messages": MESSAGES, "max_tokens": 5, "temperature": 0, "stream": True, "ignore_eos": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    bodies = [json.loads(e) for e in events[:-1]]
    assert all(b["usage"] is not None for b in bodies)
    assert bodies[-1]["choices"] == [] and bodies[-1]["usage"]["completion_tokens"] == 5
    assert r.headers["content-type"].startswith("text/event-stream")


# --- metrics ------------------------------------------------------------------------------------------


def _scrape(live: Live) -> dict[str, float]:
    r = live.http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    list(text_string_to_metric_families(r.text))  # parses with prometheus_client's parser
    return parse_metrics(r.text)


def test_metrics_move(live: Live) -> None:
    live.wait_idle()
    before = _scrape(live)
    for name in ("agentserve_num_requests_running", "agentserve_num_requests_waiting",
                 "agentserve_kv_cache_pages_used", "agentserve_kv_cache_pages_total",
                 "agentserve_prefix_cache_hit_rate", "agentserve_sessions_resident", "agentserve_sessions_swapped",
                 "agentserve_prompt_tokens_total", "agentserve_generation_tokens_total",
                 "agentserve_time_to_first_token_seconds_count", "agentserve_inter_token_latency_seconds_count",
                 "agentserve_e2e_request_latency_seconds_count", "agentserve_request_queue_time_seconds_count"):
        assert name in before, name
    assert before["agentserve_kv_cache_pages_total"] == 1024
    out = live.client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0,
                                              extra_body={"ignore_eos": True})
    chunks = list(live.client.completions.create(model=MODEL, prompt="Metrics", max_tokens=4, stream=True,
                                                 extra_body={"ignore_eos": True}))
    assert chunks
    after = _scrape(live)

    def moved(name: str) -> float:
        return after[name] - before.get(name, 0.0)

    assert moved("agentserve_generation_tokens_total") == 10
    assert moved("agentserve_prompt_tokens_total") == out.usage.prompt_tokens + len(
        live.aeng.engine.tokenizer.encode("Metrics"))
    assert moved("agentserve_time_to_first_token_seconds_count") == 2
    assert moved("agentserve_e2e_request_latency_seconds_count") == 2
    assert moved("agentserve_request_queue_time_seconds_count") == 2
    assert moved("agentserve_inter_token_latency_seconds_count") == 5 + 3
    assert moved("agentserve_e2e_request_latency_seconds_sum") > 0
    assert moved('agentserve_http_requests_total{endpoint="/v1/chat/completions",status="200"}') == 1
    assert moved('agentserve_http_requests_total{endpoint="/v1/completions",status="200"}') == 1
    assert moved('agentserve_request_success_total{finished_reason="length"}') == 2
    assert after["agentserve_prefix_cache_queries_tokens_total"] >= after["agentserve_prefix_cache_hits_tokens_total"]
    assert 0.0 <= after["agentserve_prefix_cache_hit_rate"] <= 1.0
    assert after["agentserve_num_requests_running"] == 0 and after["agentserve_kv_cache_pages_used"] == 0


def test_metrics_show_running_requests(live: Live) -> None:
    """While a request runs, the running gauge and used pages are non-zero."""

    async def main() -> dict[str, float]:
        async with httpx.AsyncClient(base_url=live.server.url, timeout=60) as client:
            async def long() -> None:
                await client.post("/v1/completions", json={"model": MODEL, "prompt": "Long", "max_tokens": 400,
                                                           "ignore_eos": True})
            task = asyncio.create_task(long())
            seen: dict[str, float] = {}
            for _ in range(200):
                await asyncio.sleep(0.01)
                seen = parse_metrics((await client.get("/metrics")).text)
                if seen["agentserve_num_requests_running"] >= 1:
                    break
            await task
            return seen

    seen = asyncio.run(main())
    assert seen["agentserve_num_requests_running"] == 1
    assert seen["agentserve_kv_cache_pages_used"] >= 1
    assert seen["agentserve_kv_cache_usage_ratio"] > 0
