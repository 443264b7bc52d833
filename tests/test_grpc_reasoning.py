"""A reasoning model over gRPC (--reasoning-parser qwen3) with the real client and server on a tiny CPU
model: Turn streams the thinking as `reasoning` deltas and only the answer as `text`, TurnDone's message
has them apart (content, reasoning_content) and usage counts reasoning_tokens; tool calls after the
thinking; an assistant message's reasoning_content sent in CreateSession / Turn / Generate reaches the
chat template; Generate splits chat messages but not raw completions (as vLLM's /v1/completions);
without a parser nothing is split.

The model's output is fixed by a seed and a bias on `</think>` (the block closes after a few tokens),
an answer regex after it; the expectation is the tokenizer's own decoding of the reply's token ids,
cut at the `</think>` token."""

from __future__ import annotations

import functools
import json
import re
from typing import Any, Callable

import grpc
import pytest
import transformers

from agentserve.adapters.client import AgentClient
from agentserve.adapters.client.client import TurnOutcome
from conftest_grpc import SYSTEM, make_engine, model_path, rpc_status, run_with_client

ARCH = "qwen3"
# A ChatML template that renders an assistant message's reasoning_content as Qwen3's does (a think block
# before the content); the tiny model's own template leaves thinking out.
THINKING_TEMPLATE = r"""
{%- if tools -%}{{- '<|im_start|>system\n# Tools\n' + (tools | tojson) + '<|im_end|>\n' -}}{%- endif -%}
{%- for message in messages -%}
{%- if message.role == 'assistant' and message.reasoning_content -%}
{{- '<|im_start|>assistant\n<think>\n' + message.reasoning_content + '\n</think>\n\n' + (message.content or '') + '<|im_end|>\n' -}}
{%- else -%}
{{- '<|im_start|>' + message.role + '\n' + (message.content or '') + '<|im_end|>\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}
"""
ENGINE = dict(max_model_len=512, num_blocks=256, chat_template=THINKING_TEMPLATE)
USER = {"role": "user", "content": "Is it so?"}
ANSWER = {"type": "regex", "regex": "(yes|no)"}
READ_FILE = [{"type": "function", "function": {"name": "read_file", "parameters": {
    "type": "object", "properties": {"path": {"enum": ["notes.txt", "todo.md"]}}, "required": ["path"]}}}]
SEEDS = range(12)


@functools.lru_cache(maxsize=None)
def tokenizer() -> Any:
    return transformers.AutoTokenizer.from_pretrained(model_path(ARCH))


def marker(text: str) -> int:
    ids = tokenizer().encode(text, add_special_tokens=False)
    assert len(ids) == 1
    return ids[0]


def think_bias() -> dict[int, float]:
    """A random-weight model rates </think> low: +21 makes it come after a few tokens of thought."""
    return {marker("</think>"): 21.0}


def expected_split(ids: list[int]) -> tuple[str, str, int]:
    """(the text between the markers, the text after the end marker, the thinking tokens) of a reply that
    starts inside its reasoning, from the tokenizer alone."""
    end = marker("</think>")
    assert end in ids
    text = tokenizer().decode(ids, skip_special_tokens=True)
    m = re.fullmatch(r"\s*(?:<think>)?(.*?)</think>(.*)", text, re.S)
    assert m is not None, text
    return m.group(1), m.group(2), ids.index(end) + 1


def template_ids(messages: list[dict[str, Any]], gen: bool) -> list[int]:
    text = tokenizer().apply_chat_template(messages, chat_template=THINKING_TEMPLATE, add_generation_prompt=gen,
                                           tokenize=False)
    return list(tokenizer().encode(text, add_special_tokens=False))


def deltas(events: list[Any], kind: str) -> tuple[str, list[int]]:
    """The concatenated text and token ids of one kind of delta (`reasoning` or `text`)."""
    picked = [getattr(ev, kind) for ev in events if ev.WhichOneof("event") == kind]
    return "".join(d.text for d in picked), [t for d in picked for t in d.token_ids]


def assert_thinking_first(events: list[Any]) -> None:
    kinds = [ev.WhichOneof("event") for ev in events]
    assert kinds[-1] == "done" and "reasoning" in kinds
    last_reasoning = max(i for i, k in enumerate(kinds) if k == "reasoning")
    assert all(k == "reasoning" for k in kinds[:last_reasoning]), kinds  # the thinking streams before the rest


async def first_turn(client: AgentClient, want: Callable[[TurnOutcome], bool], tools: Any = (),
                     **kw: Any) -> tuple[int, TurnOutcome]:
    """The first seed (and its turn, each on a fresh session) whose reply `want` accepts."""
    for seed in SEEDS:
        s = await client.create_session([SYSTEM], tools=tools)
        out = await s.run_turn([USER], temperature=1.0, seed=seed, logit_bias=think_bias(), return_token_ids=True,
                               **kw)
        if want(out):
            return seed, out
    raise AssertionError("no seed gave the reply the test needs")


def thought_then_answer(out: TurnOutcome) -> bool:
    ids = list(out.done.token_ids)
    return out.done.finish_reason == "stop" and marker("</think>") in ids[2:]  # at least two tokens of thought


@pytest.fixture(scope="module")
def aeng():  # type: ignore[no-untyped-def]
    engine = make_engine(ARCH, reasoning_parser="qwen3", **ENGINE)
    yield engine
    engine.shutdown()


def test_turn_streams_the_thinking_apart_from_the_answer(aeng) -> None:  # type: ignore[no-untyped-def]
    async def body(client: AgentClient) -> None:
        seed, out = await first_turn(client, thought_then_answer, max_tokens=30, response_format=ANSWER)
        done, ids = out.done, list(out.done.token_ids)
        # No marker in the prompt: the reply starts inside its reasoning (Qwen3 in thinking mode).
        assert not {marker("<think>"), marker("</think>")} & set(done.prompt_token_ids)
        thought, answer, thinking_tokens = expected_split(ids)
        assert thought.strip() and answer in ("yes", "no")
        assert_thinking_first(out.events)
        r_text, r_ids = deltas(out.events, "reasoning")
        t_text, t_ids = deltas(out.events, "text")
        assert r_text == done.message.reasoning_content == out.reasoning_content == thought
        assert t_text == done.message.content == out.text == answer
        assert "</think>" not in r_text + t_text
        assert (r_ids, t_ids) == (ids[:thinking_tokens], ids[thinking_tokens:])
        assert done.usage.reasoning_tokens == thinking_tokens and done.usage.completion_tokens == len(ids)
        # Without return_token_ids the deltas carry text only.
        s = await client.create_session([SYSTEM])
        plain = await s.run_turn([USER], temperature=1.0, seed=seed, max_tokens=30, logit_bias=think_bias(),
                                 response_format=ANSWER)
        assert (plain.reasoning_content, plain.text) == (thought, answer)
        assert not any(deltas(plain.events, kind)[1] for kind in ("reasoning", "text"))
        # Logprobs are split as the token ids are: the thinking's with the reasoning deltas.
        s = await client.create_session([SYSTEM])
        with_lp = await s.run_turn([USER], temperature=1.0, seed=seed, max_tokens=30, logit_bias=think_bias(),
                                   response_format=ANSWER, logprobs=1)
        assert list(with_lp.done.token_ids) == [] and (with_lp.reasoning_content, with_lp.text) == (thought, answer)
        for kind, want in (("reasoning", ids[:thinking_tokens]), ("text", ids[thinking_tokens:])):
            picked = [getattr(ev, kind) for ev in with_lp.events if ev.WhichOneof("event") == kind]
            assert [e.sampled.token_id for d in picked for e in d.logprobs] == want, kind

    run_with_client(aeng, body)


def test_tool_calls_after_the_thinking(aeng) -> None:  # type: ignore[no-untyped-def]
    async def body(client: AgentClient) -> None:
        seed, out = await first_turn(client, lambda o: o.done.finish_reason == "tool_calls", tools=READ_FILE,
                                  tool_choice="required", max_tokens=80)
        done, ids = out.done, list(out.done.token_ids)
        # Beside the calls, the whitespace between </think> and the call is no content (HTTP: null; it was "  ").
        assert done.message.content == ""
        thought, _, thinking_tokens = expected_split(ids)
        assert [c.name for c in done.message.tool_calls] == ["read_file"]
        assert json.loads(done.message.tool_calls[0].arguments)["path"] in ("notes.txt", "todo.md")
        streamed = "".join(ev.tool_call.arguments_delta for ev in out.events if ev.WhichOneof("event") == "tool_call")
        assert json.loads(streamed) == json.loads(done.message.tool_calls[0].arguments)
        r_text, r_ids = deltas(out.events, "reasoning")
        assert r_text == done.message.reasoning_content == thought and r_ids == ids[:thinking_tokens]
        assert "<tool_call>" not in r_text + done.message.content and "</think>" not in done.message.content
        assert done.usage.reasoning_tokens == thinking_tokens
        # GetSession (and a fork's) shows the reply as TurnDone did: the calls parsed out of the content
        # (it showed the model's raw <tool_call> text, and no tool_calls).
        s = client.session(done.session.session_id)
        for shown in (await s.refresh(include_messages=True), await (await s.fork()).refresh(include_messages=True)):
            reply = shown.messages[-1]
            assert (reply.content, reply.reasoning_content) == (done.message.content, thought)
            assert [(c.id, c.name, c.arguments) for c in reply.tool_calls] == \
                [(c.id, c.name, c.arguments) for c in done.message.tool_calls]
        # The same prompt and seed over stateless Generate: the same reply, split the same way.
        events = [ev async for ev in client.generate(messages=[SYSTEM, USER], tools=READ_FILE, tool_choice="required",
                                                      max_tokens=80, temperature=1.0, seed=seed,
                                                      logit_bias=think_bias(), return_token_ids=True)]
        g = events[-1].done
        assert list(g.token_ids) == ids
        assert (g.text, g.reasoning_content) == ("", thought)
        assert [(c.name, c.arguments) for c in g.tool_calls] == [(c.name, c.arguments) for c in done.message.tool_calls]

    run_with_client(aeng, body)


def test_get_session_shows_the_thinking_apart(aeng) -> None:  # type: ignore[no-untyped-def]
    """GetSession (and a fork's) shows the session's reply as TurnDone did: the thinking as
    reasoning_content, not inline in content; the next turn still extends the tokens as generated."""
    async def body(client: AgentClient) -> None:
        _, out = await first_turn(client, thought_then_answer, max_tokens=30, response_format=ANSWER)
        thought, answer, _ = expected_split(list(out.done.token_ids))
        s = client.session(out.done.session.session_id)
        for shown in (await s.refresh(include_messages=True), await (await s.fork()).refresh(include_messages=True)):
            assert [m.role for m in shown.messages] == ["system", "user", "assistant"]
            assert (shown.messages[-1].reasoning_content, shown.messages[-1].content) == (thought, answer)
        before = list((await s.refresh(include_token_ids=True)).token_ids)
        nxt = await s.run_turn([{"role": "user", "content": "Sure?"}], max_tokens=2, temperature=0.0,
                               return_token_ids=True)
        assert list(nxt.done.prompt_token_ids)[:len(before)] == before
        assert nxt.done.usage.cached_tokens >= len(before) // 16 * 16  # the history's full pages reused

    run_with_client(aeng, body)


def test_streamed_split_while_a_stop_string_holds_text_back(aeng) -> None:  # type: ignore[no-untyped-def]
    """A stop string longer than `</think>` (never matched): the detokenizer holds back its length - 1
    characters, so the marker's text can arrive in two deltas; the streamed split is the whole one's."""
    stop = ["QQQQQQQQQQQQ"]

    async def body(client: AgentClient) -> None:
        checked = 0
        for seed in range(6):
            s = await client.create_session([SYSTEM])
            out = await s.run_turn([USER], temperature=1.0, seed=seed, max_tokens=30, logit_bias=think_bias(),
                                   stop=stop)
            events = [ev async for ev in client.generate(messages=[SYSTEM, USER], temperature=1.0, seed=seed,
                                                          max_tokens=30, logit_bias=think_bias(), stop=stop)]
            done = events[-1].done
            assert (deltas(out.events, "reasoning")[0], deltas(out.events, "text")[0]) == (
                out.done.message.reasoning_content, out.done.message.content), seed
            assert (deltas(events, "reasoning")[0], deltas(events, "text")[0]) == (
                done.reasoning_content, done.text), seed
            checked += marker("</think>") in list(done.token_ids)
        assert checked  # some replies closed their thinking

    run_with_client(aeng, body)


def test_incoming_reasoning_content_reaches_the_template(aeng) -> None:  # type: ignore[no-untyped-def]
    earlier = {"role": "assistant", "content": "yes", "reasoning_content": "it is, I think"}
    follow_up = {"role": "user", "content": "And now?"}

    async def body(client: AgentClient) -> None:
        # CreateSession: the history's reasoning is rendered (the template writes a think block).
        history = [SYSTEM, USER, earlier]
        s = await client.create_session(history)
        info = await s.refresh(include_messages=True, include_token_ids=True)
        assert list(info.token_ids) == template_ids(history, gen=False)
        assert [(m.content, m.reasoning_content) for m in info.messages][-1] == ("yes", "it is, I think")
        out = await s.run_turn([follow_up], max_tokens=4, temperature=0.0, return_token_ids=True)
        assert list(out.done.prompt_token_ids) == template_ids(history + [follow_up], gen=True)
        # Turn: a turn may bring the assistant's earlier reply, reasoning and all.
        t = await client.create_session([SYSTEM, USER])
        out = await t.run_turn([earlier, follow_up], max_tokens=4, temperature=0.0, return_token_ids=True)
        assert list(out.done.prompt_token_ids) == template_ids(history + [follow_up], gen=True)
        # Generate: the same messages make the same prompt.
        done = await client.generate_done(messages=history + [follow_up], max_tokens=4, temperature=0.0)
        assert done.usage.prompt_tokens == len(template_ids(history + [follow_up], gen=True))
        code, msg = await rpc_status(client.create_session([{**USER, "reasoning_content": "hm"}]))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "messages[0]" in msg and "reasoning_content" in msg

    run_with_client(aeng, body)


def test_a_turn_sends_back_the_reasoning_it_got(aeng) -> None:  # type: ignore[no-untyped-def]
    async def body(client: AgentClient) -> None:
        _, out = await first_turn(client, thought_then_answer, max_tokens=30, response_format=ANSWER)
        reply = {"role": "assistant", "content": out.text, "reasoning_content": out.reasoning_content}
        follow_up = {"role": "user", "content": "Sure?"}
        for seed in SEEDS:
            s = await client.create_session([SYSTEM, USER, reply])  # a client that keeps the conversation itself
            second = await s.run_turn([follow_up], max_tokens=30, temperature=1.0, seed=seed, logit_bias=think_bias(),
                                      response_format=ANSWER, return_token_ids=True)
            await s.close()
            if second.done.finish_reason == "stop":
                break
        assert list(second.done.prompt_token_ids) == template_ids([SYSTEM, USER, reply, follow_up], gen=True)
        assert second.done.session.num_turns == 1 and second.done.session.num_messages == 5
        # This template writes the earlier reasoning into the prompt, so a `</think>` stands in it; but markers
        # count only after the prompt's last end-of-turn token (that earlier turn's block says nothing about
        # this reply): the reply starts inside its own reasoning, and the answer regex applies after it.
        thought, answer, thinking_tokens = expected_split(list(second.done.token_ids))
        assert second.text == answer and answer in ("yes", "no")
        assert second.reasoning_content == second.done.message.reasoning_content == thought
        assert second.done.usage.reasoning_tokens == thinking_tokens

    run_with_client(aeng, body)


def test_generate_splits_chat_messages_but_not_raw_completions(aeng) -> None:  # type: ignore[no-untyped-def]
    messages = [SYSTEM, USER]

    async def body(client: AgentClient) -> None:
        for seed in SEEDS:
            events = [ev async for ev in client.generate(messages=messages, temperature=1.0, seed=seed, max_tokens=30,
                                                          logit_bias=think_bias(), response_format=ANSWER,
                                                          return_token_ids=True)]
            done = events[-1].done
            if done.finish_reason == "stop" and marker("</think>") in list(done.token_ids)[2:]:
                break
        else:
            raise AssertionError("no seed gave a thought and an answer")
        ids = list(done.token_ids)
        thought, answer, thinking_tokens = expected_split(ids)
        assert_thinking_first(events)
        r_text, r_ids = deltas(events, "reasoning")
        t_text, t_ids = deltas(events, "text")
        assert r_text == done.reasoning_content == thought and t_text == done.text == answer
        assert (r_ids, t_ids) == (ids[:thinking_tokens], ids[thinking_tokens:])
        assert done.usage.reasoning_tokens == thinking_tokens
        # The same prompt as raw tokens: the same reply, not split (vLLM's completions run no reasoning parser).
        raw = [ev async for ev in client.generate(prompt_token_ids=template_ids(messages, gen=True), temperature=1.0,
                                                   seed=seed, max_tokens=30, logit_bias=think_bias(),
                                                   response_format=ANSWER)]
        raw_done = raw[-1].done
        assert list(raw_done.token_ids) == ids
        assert not any(ev.WhichOneof("event") == "reasoning" for ev in raw)
        assert deltas(raw, "text")[0] == raw_done.text == tokenizer().decode(ids, skip_special_tokens=True)
        assert "</think>" in raw_done.text and raw_done.reasoning_content == "" and raw_done.usage.reasoning_tokens == 0

    run_with_client(aeng, body)


def test_without_a_parser_nothing_is_split() -> None:
    engine = make_engine(ARCH, **ENGINE)

    async def body(client: AgentClient) -> None:
        _, out = await first_turn(client, lambda o: marker("</think>") in list(o.done.token_ids), max_tokens=16)
        done = out.done
        assert not any(ev.WhichOneof("event") == "reasoning" for ev in out.events)
        whole = tokenizer().decode(list(done.token_ids), skip_special_tokens=True)
        assert out.text == done.message.content == whole and "</think>" in whole
        assert done.message.reasoning_content == out.reasoning_content == "" and done.usage.reasoning_tokens == 0
        gen = await client.generate_done(messages=[SYSTEM, USER], temperature=1.0, seed=0, max_tokens=16,
                                         logit_bias=think_bias())
        assert gen.reasoning_content == "" and gen.usage.reasoning_tokens == 0

    try:
        run_with_client(engine, body)
    finally:
        engine.shutdown()
