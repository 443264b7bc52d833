"""Tool-call histories that real chat templates refuse are rendered in the shape they take (chat/template_fit.py):
ids that Mistral's templates refuse (anything but 9 characters: OpenAI's `call_...`, Anthropic's `toolu_...`, a
framework's own) as 9-character digests of themselves, the same in the call and its result and on every request;
several calls in one assistant message, which Llama 3.1's template refuses, as one message per call. Templates
that take the history as it is get it so. Offline (LLM.chat) and over HTTP."""

from __future__ import annotations

import string
from typing import Any, Iterator

import httpx
import openai
import pytest

from agentserve import SamplingParams
from agentserve.chat.template_fit import (fit_tool_call_ids, fitted_id, hoist_system, merge_runs, split_tool_calls,
                                          template_refuses, template_wants_short_ids)
from agentserve.llm import LLM
from agentserve.testing.tiny import tiny_model_cached
from helpers.live_server import live_openai, server_root
from llama31_template import LLAMA31_TEMPLATE
from mistral_v3_template import MISTRAL_V3_TEMPLATE

ALNUM = set(string.ascii_letters + string.digits)
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}


def _history(first_id: str, second_id: str) -> list[dict[str, Any]]:
    """A tool loop with two calls in one turn, answered in the other order."""
    return [
        {"role": "user", "content": "Weather in Paris and Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": first_id, "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": second_id, "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": second_id, "content": "cold"},
        {"role": "tool", "tool_call_id": first_id, "content": "sunny"},
    ]


def test_fitted_ids_are_nine_alphanumerics_stable_and_distinct() -> None:
    assert fitted_id("aB3dE6gH9") == "aB3dE6gH9"  # already fits: kept
    ids = [f"call_{i:024d}" for i in range(2000)] + ["toolu_01A09q90qw90lq917835lq9", "call-1", "", "x" * 500, "é" * 9]
    fitted = [fitted_id(i) for i in ids]
    assert all(len(f) == 9 and set(f) <= ALNUM for f in fitted)
    assert len(set(fitted)) == len(ids)
    assert fitted == [fitted_id(i) for i in ids]
    messages = fit_tool_call_ids(_history("call_abc", "toolu_xyz"))
    assert messages[1]["tool_calls"][0]["id"] == messages[3]["tool_call_id"] == fitted_id("call_abc")
    assert messages[1]["tool_calls"][1]["id"] == messages[2]["tool_call_id"] == fitted_id("toolu_xyz")


def test_only_mistral_templates_want_short_ids() -> None:
    assert template_wants_short_ids(MISTRAL_V3_TEMPLATE)
    assert template_wants_short_ids({"default": MISTRAL_V3_TEMPLATE})
    for arch in ("qwen2", "llama3"):
        with LLM(str(tiny_model_cached(arch)), device="cpu", num_blocks=16) as llm:
            assert not template_wants_short_ids(llm.engine.tokenizer.chat_template)
    assert not template_wants_short_ids(None)


def test_offline_chat_renders_any_ids_through_mistrals_template() -> None:
    with LLM(str(tiny_model_cached("mistral")), device="cpu", num_blocks=64, chat_template=MISTRAL_V3_TEMPLATE) as llm:
        long_ids = _history("call_9f8e7d6c5b4a39281706f5e4", "toolu_01A09q90qw90lq917835lq9")
        fitted = _history(fitted_id("call_9f8e7d6c5b4a39281706f5e4"), fitted_id("toolu_01A09q90qw90lq917835lq9"))
        assert llm.render_chat(long_ids, tools=[WEATHER]) == llm.render_chat(fitted, tools=[WEATHER])
        text = llm.engine.tokenizer.decode(llm.render_chat(long_ids, tools=[WEATHER]))
        assert text.count(fitted_id("call_9f8e7d6c5b4a39281706f5e4")) == 2  # the call and its result
        short = _history("abcDEF123", "XYZ987uvw")  # ids that fit are rendered as they are
        assert "abcDEF123" in llm.engine.tokenizer.decode(llm.render_chat(short, tools=[WEATHER]))
        out = llm.chat(long_ids, SamplingParams(max_tokens=4, temperature=0.0), tools=[WEATHER])
        assert len(out[0].outputs[0].token_ids) == 4


@pytest.fixture(scope="module")
def mistral_client() -> Iterator[openai.OpenAI]:
    with live_openai("mistral", served_model_name="tiny-mistral-v3", max_model_len=1024,
                     chat_template=MISTRAL_V3_TEMPLATE) as client:
        yield client


def test_http_tool_loop_with_foreign_ids_is_served(mistral_client: openai.OpenAI) -> None:
    """An OpenAI-shaped history (ids made elsewhere) answers 200 with the prompt the fitted ids give; it was
    a 400 quoting the template's "Tool call IDs should be alphanumeric strings with length 9!"."""
    def usage(messages: list[dict[str, Any]]) -> int:
        reply = mistral_client.chat.completions.create(model="tiny-mistral-v3", messages=messages, tools=[WEATHER],
                                                       max_tokens=3, temperature=0.0)
        assert reply.choices[0].finish_reason in ("length", "stop", "tool_calls")
        return reply.usage.prompt_tokens
    foreign = usage(_history("call_Xy12ab34cd56ef78gh90ij12", "call_Zz98yx76wv54ut32sr10qp98"))
    fitted = usage(_history(fitted_id("call_Xy12ab34cd56ef78gh90ij12"), fitted_id("call_Zz98yx76wv54ut32sr10qp98")))
    assert foreign == fitted
    root = server_root(mistral_client)

    def tokens(messages: list[dict[str, Any]]) -> list[int]:  # the tokenize endpoint renders them too
        reply = httpx.post(root + "/tokenize", json={"model": "tiny-mistral-v3", "tools": [WEATHER],
                                                     "messages": messages}, timeout=60)
        assert reply.status_code == 200, reply.text
        return reply.json()["tokens"]
    assert tokens(_history("call_a", "call_b")) == tokens(_history(fitted_id("call_a"), fitted_id("call_b")))


def test_one_call_per_message_only_for_templates_that_refuse_several() -> None:
    with LLM(str(tiny_model_cached("llama3")), device="cpu", num_blocks=16) as llm:
        tok = llm.engine.tokenizer
        assert template_refuses(tok, LLAMA31_TEMPLATE, "several_calls")
        assert not template_refuses(tok, None, "several_calls")  # the tiny template writes several in one message
        never = "{{ raise_exception('never renders') }}"
        assert not any(template_refuses(tok, never, shape) for shape in ("several_calls", "user_run", "late_system"))
        assert not template_refuses(tok, LLAMA31_TEMPLATE, "user_run")  # Llama 3.1 takes runs of user messages
        assert template_refuses(tok, MISTRAL_V3_TEMPLATE, "user_run")
        assert template_refuses(tok, MISTRAL_V3_TEMPLATE, "late_system")
        assert not template_refuses(tok, LLAMA31_TEMPLATE, "late_system")


def test_offline_chat_renders_parallel_calls_through_llamas_template() -> None:
    with LLM(str(tiny_model_cached("llama3")), device="cpu", num_blocks=64, chat_template=LLAMA31_TEMPLATE) as llm:
        history = _history("call_1", "call_2")
        text = llm.engine.tokenizer.decode(llm.render_chat(history, tools=[WEATHER]))
        assert llm.render_chat(history, tools=[WEATHER]) == llm.render_chat(split_tool_calls(history), tools=[WEATHER])
        assert text.count('{"name": "get_weather", "parameters": ') == 2
        assert text.index('"Paris"') < text.index('"Oslo"') < text.index("cold") < text.index("sunny")
        out = llm.chat(history, SamplingParams(max_tokens=4, temperature=0.0), tools=[WEATHER])
        assert len(out[0].outputs[0].token_ids) == 4


def test_http_parallel_calls_in_a_llama_31_history_are_served() -> None:
    """The reply to a history with two calls in one message: 200 (it was a 400 quoting the template's "This
    model only supports single tool-calls at once!"), with the prompt of the split history."""
    with live_openai("llama3", served_model_name="tiny-llama31", max_model_len=1024,
                     chat_template=LLAMA31_TEMPLATE) as client:
        usage = [client.chat.completions.create(model="tiny-llama31", messages=messages, tools=[WEATHER], max_tokens=3,
                                                temperature=0.0).usage.prompt_tokens
                 for messages in (_history("call_1", "call_2"), split_tool_calls(_history("call_1", "call_2")))]
    assert usage[0] == usage[1]


def test_runs_of_user_and_system_messages_merge_for_templates_that_alternate() -> None:
    """Two user messages in a row (a framework's format instruction after the question), a second system message
    and one added mid-conversation: Mistral's template raised on each; they render as one leading system message
    and one user message per run, their texts as paragraphs."""
    runs = [{"role": "system", "content": "Be brief."}, {"role": "system", "content": "Answer in French."},
            {"role": "user", "content": "Weather in Paris?"}, {"role": "user", "content": "Reply as JSON."},
            {"role": "assistant", "content": "{}"}, {"role": "system", "content": "Now use Celsius."},
            {"role": "user", "content": "And Oslo?"}]
    merged = [{"role": "system", "content": "Be brief.\n\nAnswer in French.\n\nNow use Celsius."},
              {"role": "user", "content": "Weather in Paris?\n\nReply as JSON."},
              {"role": "assistant", "content": "{}"}, {"role": "user", "content": "And Oslo?"}]
    assert merge_runs(hoist_system(runs), "user") == merged
    with LLM(str(tiny_model_cached("mistral")), device="cpu", num_blocks=64, chat_template=MISTRAL_V3_TEMPLATE) as llm:
        assert llm.render_chat(runs) == llm.render_chat(merged)
        assert len(llm.chat(runs, SamplingParams(max_tokens=3, temperature=0.0))[0].outputs[0].token_ids) == 3
    with LLM(str(tiny_model_cached("llama3")), device="cpu", num_blocks=64, chat_template=LLAMA31_TEMPLATE) as llm:
        assert llm.render_chat(runs) != llm.render_chat(merged)  # a template that takes them keeps them


def test_llamas_ipython_role_is_rendered_as_transformers_renders_it() -> None:
    """Llama 3.x's own tool-result role (its template renders `ipython` messages; vLLM passes custom roles to
    the template): the offline chat's prompt equals transformers' apply_chat_template, where it was a 400."""
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                                     "arguments": '{"city": "Paris"}'}}]},
               {"role": "ipython", "content": "18C"}]
    with LLM(str(tiny_model_cached("llama3")), device="cpu", num_blocks=64, chat_template=LLAMA31_TEMPLATE) as llm:
        tok = llm.engine.tokenizer
        expected_history = [history[0], {**history[1], "content": "", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
            history[2]]
        expected = tok.apply_chat_template(expected_history, tools=[WEATHER], chat_template=LLAMA31_TEMPLATE,
                                           add_generation_prompt=True, tokenize=False)
        assert '<|start_header_id|>ipython<|end_header_id|>\n\n"18C"' in expected
        assert tok.decode(llm.render_chat(history, tools=[WEATHER])) == expected
