"""Responses `truncation: "auto"` (OpenAI's: a conversation past the context window loses its oldest items):
an agent loop whose conversation outgrows the context goes on with its recent turns, where `"disabled"` (the
default) answers context_length_exceeded. Whole turns are dropped (a user message and what followed it), the
instructions stay, the reply keeps its room; when the newest turn alone does not fit, the request still fails."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Callable, Iterator

import httpx
import openai
import pytest

from agentserve.adapters.openai.app import create_app
from agentserve.adapters.openai.server import ServerThread
from agentserve.config import EngineConfig
from agentserve.engine.async_engine import AsyncEngine
from agentserve.engine.engine import Engine
from agentserve.testing.tiny import tiny_model_cached

MODEL = "tiny-qwen2"
CONTEXT = 384
TURN = " ".join(f"word{i}" for i in range(40))  # one turn's text: well under the context, a few fill it


@pytest.fixture(scope="module")
def client() -> Iterator[openai.OpenAI]:
    config = EngineConfig.from_kwargs(str(tiny_model_cached("qwen2")), device="cpu", num_blocks=256,
                                      served_model_name=MODEL, max_model_len=CONTEXT)
    aeng = AsyncEngine(Engine(config))
    server = ServerThread(create_app(aeng, config)).start()
    yield openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
    server.stop()
    aeng.shutdown()


def _loop_until_full(client: openai.OpenAI) -> tuple[str, int]:
    """Chains turns until the next one would not fit; returns the last response's id and its input tokens."""
    prev = client.responses.create(model=MODEL, instructions="Be brief.", input=TURN, max_output_tokens=4,
                                   temperature=0)
    for _ in range(20):
        try:
            nxt = client.responses.create(model=MODEL, instructions="Be brief.", input=TURN, max_output_tokens=4,
                                          temperature=0, previous_response_id=prev.id)
        except openai.BadRequestError as e:
            assert e.code == "context_length_exceeded" or "max_model_len" in str(e), e
            return prev.id, prev.usage.input_tokens
        prev = nxt
    raise AssertionError("the conversation never outgrew the context")


def test_auto_drops_the_oldest_turns_and_disabled_fails(client: openai.OpenAI) -> None:
    last, tokens = _loop_until_full(client)
    assert tokens > CONTEXT // 2
    kw = dict(model=MODEL, instructions="Be brief.", input=TURN, max_output_tokens=4, temperature=0,
              previous_response_id=last)
    with pytest.raises(openai.BadRequestError):
        client.responses.create(truncation="disabled", **kw)
    r = client.responses.create(truncation="auto", **kw)
    assert r.status in ("completed", "incomplete") and r.usage.output_tokens >= 1
    assert r.usage.input_tokens + 4 <= CONTEXT and r.usage.input_tokens <= tokens  # older turns dropped (one more would not fit)
    # The truncated response is stored as the conversation it ran on: continued twice alike (in place, then
    # rendered from the store), both see the same prompt (the store kept the whole chain: the second failed).
    short = dict(model=MODEL, input="ok", max_output_tokens=2, temperature=0, previous_response_id=r.id,
                 instructions="Be brief.")
    twice = [client.responses.create(**short) for _ in range(2)]
    assert twice[0].usage.input_tokens == twice[1].usage.input_tokens
    # It continues like any other (truncating again as it must).
    again = client.responses.create(truncation="auto", **{**kw, "previous_response_id": r.id})
    assert again.usage.input_tokens + 4 <= CONTEXT


@contextlib.contextmanager
def _fitting(conv: list) -> Iterator[tuple[Callable[[list], int], Callable[[int], object]]]:
    """(the chat template's token count of some messages, fit_conversation of `conv` to a budget) over the tiny
    qwen2's tokenizer, in a render pool of its own."""
    from transformers import AutoTokenizer

    from agentserve.adapters.openai.responses_truncation import fit_conversation
    from agentserve.chat.render_pool import RenderPool
    from agentserve.config import ServerConfig

    tok = AutoTokenizer.from_pretrained(str(tiny_model_cached("qwen2")))
    pool = RenderPool(tok, CONTEXT, ServerConfig())

    def size(msgs: list) -> int:
        text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        return len(tok.encode(text, add_special_tokens=False))

    def fit(budget: int) -> object:
        return asyncio.run(fit_conversation(pool, conv, None, budget, 10**6, {}))

    try:
        yield size, fit
    finally:
        pool.close()


def test_whole_turns_are_dropped_and_the_instructions_stay() -> None:
    """fit_conversation on the chat template's own count: the fewest oldest turns (a user message and the
    assistant calls and tool results after it) go, the system message stays; None when nothing needs to go
    or nothing would help."""
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    conv = [{"role": "system", "content": "rules"}, {"role": "user", "content": "one " + TURN},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "result " + TURN},
            {"role": "assistant", "content": "ok"}, {"role": "user", "content": "two " + TURN},
            {"role": "assistant", "content": "fine"}, {"role": "user", "content": "three"}]
    with _fitting(conv) as (size, fit):
        assert fit(size(conv)) is None  # fits whole
        assert fit(size(conv) - 1) == [conv[0]] + conv[5:]  # the first turn (with its call and result) goes
        assert fit(size([conv[0]] + conv[5:]) - 1) == [conv[0], conv[7]]  # then the second
        assert fit(size([conv[0], conv[7]]) - 1) is None  # the newest alone does not fit: nothing helps


def test_an_agent_loops_oldest_rounds_go_and_its_task_stays() -> None:
    """One task, then rounds of tool calls and results past the context: "auto" failed as "disabled" does (only
    user messages were cut points); now the oldest rounds go, whole, and the task's user message stays."""
    conv: list = [{"role": "system", "content": "rules"}, {"role": "user", "content": "Summarise the files."}]
    for i in range(4):
        call = {"id": f"call_{i}", "type": "function", "function": {"name": "read", "arguments": "{}"}}
        conv += [{"role": "assistant", "content": None, "tool_calls": [call]},
                 {"role": "tool", "tool_call_id": f"call_{i}", "content": f"file {i} " + TURN}]
    with _fitting(conv) as (size, fit):
        assert fit(size(conv) - 1) == conv[:2] + conv[4:]  # the first round (its call and result) goes
        assert fit(size(conv[:2] + conv[6:]) - 1) == conv[:2] + conv[8:]  # then two more: the newest stays


def test_the_newest_turn_is_kept(client: openai.OpenAI) -> None:
    last, _ = _loop_until_full(client)
    r = client.responses.create(model=MODEL, instructions="Be brief.", input="newest " + TURN,
                                max_output_tokens=4, temperature=0, previous_response_id=last, truncation="auto")
    http = httpx.Client(base_url=str(client.base_url).removesuffix("/v1/"), timeout=60)
    items = http.get(f"/v1/responses/{r.id}/input_items").json()["data"]
    assert items and "newest" in str(items[0])  # its own input is the newest item
    assert r.usage.input_tokens + 4 <= CONTEXT


def test_a_turn_that_alone_does_not_fit_still_fails(client: openai.OpenAI) -> None:
    huge = " ".join(f"w{i}" for i in range(CONTEXT))
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model=MODEL, input=huge, max_output_tokens=4, truncation="auto")
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input="x", truncation="sometimes")
    assert e.value.body["param"] == "truncation"  # type: ignore[index]
