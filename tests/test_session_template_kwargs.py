"""Chat-template variables on sessions (vLLM's chat_template_kwargs), over gRPC and the Responses API:
a Qwen3-style template's `enable_thinking` switch set once for a session renders every turn (and a
fork's) as transformers renders the conversation with it; Responses' `reasoning.effort` sets it as vLLM
does; bad variables are refused naming the field. Also the Responses API's vLLM extras (stop,
logit_bias, penalties, structured_outputs) give what a chat completion with the same fields gives."""

from __future__ import annotations

import functools
import json
from typing import Any, Iterator

import grpc
import httpx
import openai
import pytest
import transformers

from agentserve.adapters.client import AgentClient
from agentserve.adapters.openai.app import create_app
from agentserve.adapters.openai.server import ServerThread
from conftest_grpc import make_engine, model_path, rpc_status, run_with_client

ARCH = "qwen3"
# Qwen3's switch, reduced: without thinking the generation prompt carries an empty think block.
TEMPLATE = r"""
{%- for message in messages -%}
{{- '<|im_start|>' + message.role + '\n' + (message.content or '') + '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|im_start|>assistant\n' -}}
{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\n\n</think>\n\n' -}}{%- endif -%}
{%- endif -%}
"""
EMPTY_THINK = "<think>\n\n</think>\n\n"
OFF = {"enable_thinking": False}


@functools.lru_cache(maxsize=None)
def tokenizer() -> Any:
    return transformers.AutoTokenizer.from_pretrained(model_path(ARCH))


def rendered_ids(messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
    """The reference: transformers renders the conversation with the variables, then tokenizes it."""
    text = tokenizer().apply_chat_template(messages, chat_template=TEMPLATE, add_generation_prompt=True,
                                           tokenize=False, **kwargs)
    return list(tokenizer().encode(text, add_special_tokens=False))


@pytest.fixture(scope="module")
def aeng():  # type: ignore[no-untyped-def]
    engine = make_engine(ARCH, max_model_len=512, num_blocks=256, chat_template=TEMPLATE)
    yield engine
    engine.shutdown()


def test_a_sessions_variables_render_every_turn_and_its_forks(aeng) -> None:  # type: ignore[no-untyped-def]
    async def body(client: AgentClient) -> None:
        user = {"role": "user", "content": "Is it so?"}
        s = await client.create_session(chat_template_kwargs=OFF)
        assert json.loads(s.info.chat_template_kwargs) == OFF
        first = await s.run_turn([user], max_tokens=4, temperature=0.0, return_token_ids=True)
        assert list(first.done.prompt_token_ids) == rendered_ids([user], enable_thinking=False)
        assert tokenizer().decode(list(first.done.prompt_token_ids)).endswith(EMPTY_THINK)
        # The next turn renders the whole conversation with them again (the history as generated).
        reply = {"role": "assistant", "content": tokenizer().decode(list(first.done.token_ids),
                                                                     skip_special_tokens=True)}
        nxt = {"role": "user", "content": "Sure?"}
        second = await s.run_turn([nxt], max_tokens=4, temperature=0.0, return_token_ids=True, ignore_eos=True)
        assert tokenizer().decode(list(second.done.prompt_token_ids)).endswith("Sure?<|im_end|>\n"
                                                                               "<|im_start|>assistant\n" + EMPTY_THINK)
        assert second.done.usage.cached_tokens > 0
        assert tokenizer().decode(rendered_ids([user, reply, nxt], enable_thinking=False)).endswith(EMPTY_THINK)
        fork = await s.fork()
        assert json.loads((await fork.refresh()).chat_template_kwargs) == OFF
        forked = await fork.run_turn([{"role": "user", "content": "Why?"}], max_tokens=2, temperature=0.0,
                                     return_token_ids=True)
        assert tokenizer().decode(list(forked.done.prompt_token_ids)).endswith(EMPTY_THINK)
        # Stateless Generate over the same messages renders them the same way.
        done = await client.generate_done(messages=[user], max_tokens=4, temperature=0.0, chat_template_kwargs=OFF,
                                          return_token_ids=True)
        assert list(done.token_ids) == list(first.done.token_ids)
        assert done.usage.prompt_tokens == len(rendered_ids([user], enable_thinking=False))
        # Without them: the template's default (thinking), no empty block.
        plain = await client.create_session()
        assert plain.info.chat_template_kwargs == ""
        out = await plain.run_turn([user], max_tokens=2, temperature=0.0, return_token_ids=True)
        assert list(out.done.prompt_token_ids) == rendered_ids([user])

    run_with_client(aeng, body)


def test_bad_variables_are_invalid_argument_naming_the_field(aeng) -> None:  # type: ignore[no-untyped-def]
    async def body(client: AgentClient) -> None:
        from agentserve.service import agent_pb2 as pb
        for text, field in (("{oops", "chat_template_kwargs"), ("[1]", "chat_template_kwargs"),
                            ('{"tools": []}', "chat_template_kwargs.tools"),
                            ('{"chat_template": "x"}', "chat_template_kwargs.chat_template"),
                            ('{"not a name": 1}', "chat_template_kwargs")):
            code, details = await rpc_status(client.stub.CreateSession(pb.CreateSessionRequest(
                chat_template_kwargs=text), metadata=client.metadata))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and field in details, (text, details)
        code, details = await rpc_status(client.create_session(
            [{"role": "user", "token_ids": [1, 2]}], raw_tokens=True, chat_template_kwargs=OFF))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "chat_template_kwargs" in details, details
        for kw in (dict(prompt="hi"), dict(messages=[{"role": "user", "content": "hi"}])):
            bad = OFF if "prompt" in kw else {"tools": 1}
            code, details = await rpc_status(client.generate_done(max_tokens=1, chat_template_kwargs=bad, **kw))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "chat_template_kwargs" in details, (kw, details)

    run_with_client(aeng, body)


def test_variables_named_like_the_renderers_own_arguments(aeng) -> None:  # type: ignore[no-untyped-def]
    """`tokenizer` and `field` are template variables like any other (they bound to the renderer's own keyword
    arguments: INTERNAL "got multiple values for argument 'tokenizer'", and `field` never reached the template);
    `self` is apply_chat_template's own, refused naming it."""
    async def body(client: AgentClient) -> None:
        done = await client.generate_done(messages=QUESTION, max_tokens=1, temperature=0.0,
                                          chat_template_kwargs={"tokenizer": "x", "field": "F", **OFF})
        assert done.usage.prompt_tokens == len(rendered_ids(QUESTION, enable_thinking=False))
        code, details = await rpc_status(client.generate_done(messages=QUESTION, max_tokens=1,
                                                              chat_template_kwargs={"self": 1}))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "chat_template_kwargs.self" in details, details

    run_with_client(aeng, body)
    from agentserve.chat.render_pool import RenderPool
    pool = RenderPool(tokenizer(), 512, aeng.engine.config.server)
    text = pool.render(tokenizer(), QUESTION, None, add_generation_prompt=False, chat_template="[{{ field }}|{{ tokenizer }}]",
                       template_kwargs={"field": "F", "tokenizer": "T"})
    assert text == "[F|T]"


# --- the Responses API --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def http(aeng) -> Iterator[tuple[openai.OpenAI, httpx.Client]]:  # type: ignore[no-untyped-def]
    server = ServerThread(create_app(aeng, aeng.engine.config)).start()
    yield (openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60),
           httpx.Client(base_url=server.url, timeout=60))
    server.stop()


QUESTION = [{"role": "user", "content": "Is it so?"}]


def test_responses_reasoning_effort_and_template_kwargs(http: tuple[openai.OpenAI, httpx.Client]) -> None:
    client, _ = http
    base = dict(model=aeng_name(client), input="Is it so?", max_output_tokens=2, temperature=0)
    plain = client.responses.create(**base)
    assert plain.usage.input_tokens == len(rendered_ids(QUESTION))
    off = len(rendered_ids(QUESTION, enable_thinking=False))
    none = client.responses.create(reasoning={"effort": "none"}, **base)
    assert none.usage.input_tokens == off and none.reasoning.effort == "none"
    kwargs = client.responses.create(extra_body={"chat_template_kwargs": OFF}, **base)
    assert kwargs.usage.input_tokens == off
    # Explicit variables win over the effort's; a low effort keeps thinking on.
    assert client.responses.create(reasoning={"effort": "low"}, **base).usage.input_tokens == plain.usage.input_tokens
    both = client.responses.create(reasoning={"effort": "low"}, extra_body={"chat_template_kwargs": OFF}, **base)
    assert both.usage.input_tokens == off
    # A continuation renders the whole conversation with the same variables, on the same session (the
    # template drops the empty think block from history, so the pages up to it are reused).
    nxt = client.responses.create(previous_response_id=none.id, reasoning={"effort": "none"},
                                  **dict(base, input="Sure?"))
    conversation = QUESTION + [{"role": "assistant", "content": none.output_text}, {"role": "user", "content": "Sure?"}]
    assert nxt.usage.input_tokens == len(rendered_ids(conversation, enable_thinking=False))
    assert nxt.usage.input_tokens_details.cached_tokens > 0


def test_chat_reasoning_effort_reaches_the_template(http: tuple[openai.OpenAI, httpx.Client]) -> None:
    client, raw = http
    kw: dict[str, Any] = dict(model=aeng_name(client), messages=QUESTION, max_tokens=2, temperature=0)
    assert client.chat.completions.create(**kw).usage.prompt_tokens == len(rendered_ids(QUESTION))
    off = len(rendered_ids(QUESTION, enable_thinking=False))
    assert client.chat.completions.create(reasoning_effort="none", **kw).usage.prompt_tokens == off
    explicit = client.chat.completions.create(reasoning_effort="none", extra_body={
        "chat_template_kwargs": {"enable_thinking": True}}, **kw)
    assert explicit.usage.prompt_tokens == len(rendered_ids(QUESTION))  # the request's own variables win
    bad = raw.post("/v1/chat/completions", json={"model": aeng_name(client), "messages": QUESTION,
                                                 "reasoning_effort": 5})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "reasoning_effort", bad.text


def test_responses_refuse_bad_variables(http: tuple[openai.OpenAI, httpx.Client]) -> None:
    client, raw = http
    for extra, param in (({"chat_template_kwargs": {"add_generation_prompt": False}},
                          "chat_template_kwargs.add_generation_prompt"),
                         ({"reasoning": {"effort": 3}}, "reasoning.effort"),
                         ({"cache_salt": ""}, "cache_salt"),
                         ({"priority": 5}, "priority"),  # the server schedules fcfs
                         ({"skip_special_tokens": False}, "skip_special_tokens"),
                         ({"include_stop_str_in_output": True}, "include_stop_str_in_output"),
                         ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
                         ({"structured_outputs": {"regex": "a", "structural_tag": "{}"}}, "structured_outputs"),
                         ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs.structural_tag"),
                         ({"structured_outputs": {"regex": "a", "backend": "outlines"}}, "structured_outputs.backend"),
                         ({"structured_outputs": {"regex": "a"}, "text": {"format": {"type": "json_object"}}},
                          "structured_outputs")):
        resp = raw.post("/v1/responses", json={"model": aeng_name(client), "input": "x", **extra})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == param, (extra, resp.text)


def test_responses_sampling_extras_match_chat_completions(http: tuple[openai.OpenAI, httpx.Client]) -> None:
    client, _ = http
    model = aeng_name(client)
    free = client.responses.create(model=model, input="Is it so?", max_output_tokens=16, temperature=0).output_text
    assert len(free) > 4
    cases: list[dict[str, Any]] = [
        {"stop": [free[len(free) // 2:len(free) // 2 + 2]]},
        {"logit_bias": {str(tokenizer().encode("yes", add_special_tokens=False)[0]): 100}},
        {"repetition_penalty": 1.8, "presence_penalty": 1.0, "frequency_penalty": 0.5},
        {"structured_outputs": {"regex": "(yes|no) (yes|no)"}},
        {"structured_outputs": {"choice": ["alpha", "beta gamma"]}},
        {"structured_outputs": {"json": {"type": "object", "properties": {"ok": {"type": "boolean"}},
                                         "required": ["ok"], "additionalProperties": False}}},
    ]
    for extra in cases:
        chat = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=16, temperature=0,
                                              extra_body=extra).choices[0].message.content
        got = client.responses.create(model=model, input="Is it so?", max_output_tokens=16, temperature=0,
                                      extra_body=extra).output_text
        assert got == chat, (extra, got, chat)
        if "stop" in extra:
            assert extra["stop"][0] not in got and free.startswith(got)
        if "structured_outputs" in extra:
            assert got in ("yes yes", "yes no", "no yes", "no no", "alpha", "beta gamma") or \
                json.loads(got) in ({"ok": True}, {"ok": False}), got
        if "logit_bias" in extra:
            assert got.startswith(tokenizer().decode([int(next(iter(extra["logit_bias"])))]))
    assert client.responses.create(model=model, input="Is it so?", max_output_tokens=4, temperature=0,
                                   extra_body={"cache_salt": "s1"}).status in ("completed", "incomplete")


def aeng_name(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id
