"""vLLM's thinking_token_budget: with a reasoning parser, a reply's reasoning block holds at most that many
tokens, then `</think>` is forced and the answer (free, or under the request's constraint) follows. The
budget follows speculation's rollbacks (greedy outputs with speculation equal those without), a prompt
that closed the block is not bounded, and a server without a parser refuses the field by name."""

from __future__ import annotations

from typing import Any, Iterator

import anthropic
import grpc
import openai
import pytest
import transformers

from agentserve import SamplingParams
from agentserve.adapters.client import AgentClient
from agentserve.errors import InvalidRequestError
from agentserve.grammar.interface import allocate_token_bitmask, bitmask_to_ids
from agentserve.grammar.reasoning import ReasoningMarkers
from agentserve.grammar.thinking_budget import budget_matcher
from agentserve.grammar.tokenizer_info import TokenizerInfo
from agentserve.llm import LLM
from agentserve.sampling_params import SamplingParamsError
from agentserve.testing import tiny_model_cached
from conftest_grpc import SYSTEM, make_engine, rpc_status, run_with_client
from helpers.live_server import live_openai
from helpers.spec_models import greedy_token_ids, speculative_token_ids

ARCH = "qwen3"
ENGINE = dict(device="cpu", dtype="float32", max_model_len=256, num_blocks=128, reasoning_parser="qwen3")
PROMPTS = ["Think it over: a b a b a b", "Why is the sky blue?"]


@pytest.fixture(scope="module")
def llm() -> Iterator[LLM]:
    engine = LLM(str(tiny_model_cached(ARCH)), **ENGINE)
    yield engine
    engine.close()


def _markers(llm: LLM) -> ReasoningMarkers:
    assert llm.engine.reasoning is not None
    return llm.engine.reasoning


def test_only_the_markers_after_the_last_end_of_turn_decide(llm: LLM) -> None:
    """An earlier turn's block (a session's history, a template that renders the reasoning of the tool loop's
    assistant messages) says nothing about this reply: its `</think>` before an end-of-turn token does not
    close this reply's reasoning; markers after the last end-of-turn token do."""
    tok, markers = llm.tokenizer, _markers(llm)
    assert markers.turn_end_ids == frozenset(llm.engine.eos_token_ids)
    earlier = tok.encode("<|im_start|>assistant\n<think>\nhm\n</think>\n\nyes<|im_end|>\n"
                         "<|im_start|>user\nSure?<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    assert set(earlier) & markers.turn_end_ids  # the template's end-of-turn token is an EOS id of this model
    assert not markers.ended_in(earlier)
    assert markers.ended_in(earlier + tok.encode("<think>\n\n</think>\n\n", add_special_tokens=False))
    assert markers.ended_in(tok.encode("Q: x </think>", add_special_tokens=False))  # no turns: the whole prompt


def test_matcher_forces_the_end_marker_at_the_budget_and_follows_rollbacks(llm: LLM) -> None:
    markers, vocab = _markers(llm), llm.engine.arch.vocab_size
    info = TokenizerInfo.from_hf(llm.tokenizer, vocab_size=vocab, eos_token_ids=sorted(llm.engine.eos_token_ids))
    matcher = budget_matcher(info, markers, [5, 6], budget=3)
    assert matcher is not None
    assert budget_matcher(info, markers, [5, markers.start_id, markers.end_id], budget=3) is None  # closed: no bound
    mask = allocate_token_bitmask(1, vocab)
    thought = [11, 12, 13]
    for i, token in enumerate(thought):
        matcher.fill_bitmask(mask)
        assert len(bitmask_to_ids(mask[0], vocab)) == vocab - len(llm.engine.eos_token_ids), i  # free, no EOS
        assert matcher.accept_token(token)
    matcher.fill_bitmask(mask)
    assert bitmask_to_ids(mask[0], vocab) == [markers.end_id]  # the budget is spent
    assert not matcher.accept_token(14)
    copy = matcher.copy()
    assert matcher.accept_tokens([markers.end_id, 20, 21]) == 3
    matcher.fill_bitmask(mask)
    assert len(bitmask_to_ids(mask[0], vocab)) == vocab  # the answer is free, EOS included
    matcher.rollback(4)  # back across the end marker and one thought: one token of budget left
    matcher.fill_bitmask(mask)
    assert len(bitmask_to_ids(mask[0], vocab)) > 1 and matcher.accept_token(15)
    matcher.fill_bitmask(mask)
    assert bitmask_to_ids(mask[0], vocab) == [markers.end_id]
    copy.fill_bitmask(mask)  # the copy kept its own state: still at the budget
    assert bitmask_to_ids(mask[0], vocab) == [markers.end_id]


@pytest.mark.parametrize("budget", [0, 1, 5])
def test_engine_ends_the_reasoning_at_the_budget(llm: LLM, budget: int) -> None:
    end = _markers(llm).end_id
    free = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    unbounded = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, free)]
    assert all(end not in ids[:budget + 1] for ids in unbounded)  # a random model does not close it itself
    bounded = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, free.clone(thinking_token_budget=budget))]
    for want, got in zip(unbounded, bounded):
        assert got[:budget] == want[:budget] and got[budget] == end  # the same thought, then the forced end
        assert len(got) == 24
    # Sampled, n > 1: every sequence's block ends at the budget.
    sampled = llm.generate(PROMPTS[:1], free.clone(temperature=1.0, seed=3, n=3, thinking_token_budget=budget))
    assert [c.token_ids[budget] for c in sampled[0].outputs] == [end] * 3


def test_budget_with_a_constraint_and_a_closed_prompt(llm: LLM) -> None:
    markers = _markers(llm)
    prompt = llm.tokenizer.encode("Is it so? ", add_special_tokens=False)
    regex = SamplingParams(regex="(yes|no)", temperature=0.0, max_tokens=24, thinking_token_budget=4)
    out = llm.generate([prompt], regex)[0].outputs[0]
    assert out.token_ids[4] == markers.end_id and out.finish_reason == "stop"
    assert out.text.split("</think>", 1)[1] in ("yes", "no")
    # A prompt that closed the reasoning (thinking off): nothing to bound, the output as without a budget.
    closed = [prompt + [markers.start_id, markers.end_id]]
    free = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    assert llm.generate(closed, free.clone(thinking_token_budget=0))[0].outputs[0].token_ids == \
        llm.generate(closed, free)[0].outputs[0].token_ids


@pytest.mark.parametrize("proposer", ["ngram", "draft"])
def test_budget_is_exact_under_speculation(proposer: str) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, thinking_token_budget=6)
    want = greedy_token_ids(str(tiny_model_cached(ARCH)), PROMPTS, params, **ENGINE)
    assert speculative_token_ids(ARCH, proposer, PROMPTS, params, **ENGINE) == want


def test_bad_budgets_are_refused_by_name() -> None:
    for bad in (-1, 1.5, "3", True):
        with pytest.raises(SamplingParamsError, match="thinking_token_budget"):
            SamplingParams(thinking_token_budget=bad)  # type: ignore[arg-type]
    plain = LLM(str(tiny_model_cached(ARCH)), **{**ENGINE, "reasoning_parser": None})
    with pytest.raises(InvalidRequestError, match="thinking_token_budget needs the server's --reasoning-parser"):
        plain.generate(["hi"], SamplingParams(max_tokens=4, thinking_token_budget=2))
    plain.close()


def test_http_chat_and_messages_apis_take_the_budget() -> None:
    end = transformers.AutoTokenizer.from_pretrained(str(tiny_model_cached(ARCH))).encode(
        "</think>", add_special_tokens=False)[0]
    with live_openai(ARCH, max_model_len=256, reasoning_parser="qwen3") as chat:
        body: dict[str, Any] = dict(model="m", messages=[{"role": "user", "content": "Why?"}], max_tokens=12,
                                    temperature=0.0)
        out = chat.chat.completions.create(**body, extra_body={
            "thinking_token_budget": 3, "return_token_ids": True, "ignore_eos": True,
            "chat_template_kwargs": {"enable_thinking": True}})
        choice = out.choices[0]
        assert choice.model_extra["token_ids"][3] == end
        thought, content = choice.message.model_extra["reasoning_content"], choice.message.content
        assert thought and content
        # Anthropic's thinking.budget_tokens is the same budget: the same thought and answer.
        claude = anthropic.Anthropic(base_url=str(chat.base_url).removesuffix("/v1/"), api_key="k", max_retries=0)
        message = claude.messages.create(model="m", max_tokens=12, messages=body["messages"], extra_body={"temperature": 0.0},
                                         thinking={"type": "enabled", "budget_tokens": 3})
        blocks = {block.type: block for block in message.content}
        assert blocks["thinking"].thinking == thought and blocks["text"].text == content
        for bad in (-1, 1.5):
            with pytest.raises(openai.BadRequestError) as err:
                chat.chat.completions.create(**body, extra_body={"thinking_token_budget": bad})
            assert err.value.body["param"] == "thinking_token_budget", err.value.body
        # The Responses API takes it too: the reply's reasoning is the budget and its end marker.
        response = chat.responses.create(model="m", input="Why?", max_output_tokens=12, temperature=0.0,
                                         extra_body={"thinking_token_budget": 3, "ignore_eos": True})
        assert response.usage.output_tokens_details.reasoning_tokens == 3 + 1
        assert [item.type for item in response.output] == ["reasoning", "message"]
    with live_openai(ARCH, max_model_len=256) as plain:  # no reasoning parser
        with pytest.raises(openai.BadRequestError) as err:
            plain.chat.completions.create(**body, extra_body={"thinking_token_budget": 3})
        assert err.value.body["param"] == "thinking_token_budget" and "--reasoning-parser" in err.value.body["message"]
        # Anthropic's clients send a budget whenever thinking is on: served, with nothing to bound it by.
        claude = anthropic.Anthropic(base_url=str(plain.base_url).removesuffix("/v1/"), api_key="k", max_retries=0)
        assert claude.messages.create(model="m", max_tokens=4, messages=body["messages"],
                                      thinking={"type": "enabled", "budget_tokens": 1024}).stop_reason == "max_tokens"


def test_grpc_generate_and_turns_take_the_budget() -> None:
    """SamplingParams.thinking_token_budget of the native API: Generate and a session's Turn end the reasoning
    at the budget (the reply's token ids), and a server without a parser answers INVALID_ARGUMENT naming it."""
    end = transformers.AutoTokenizer.from_pretrained(str(tiny_model_cached(ARCH))).encode(
        "</think>", add_special_tokens=False)[0]
    greedy: dict[str, Any] = dict(temperature=0.0, max_tokens=10, ignore_eos=True, thinking_token_budget=2)

    async def body(client: AgentClient) -> None:
        done = await client.generate_done(prompt_token_ids=[5, 6, 7], **greedy)
        assert list(done.token_ids)[2] == end
        session = await client.create_session([SYSTEM])
        try:
            for question in ("Why?", "And then?"):  # the second turn's prompt holds the first reply's </think>
                outcome = await session.run_turn([{"role": "user", "content": question}], return_token_ids=True,
                                                 **greedy)
                assert list(outcome.done.token_ids)[2] == end, question
        finally:
            await session.close()

    aeng = make_engine(ARCH, reasoning_parser="qwen3")
    try:
        run_with_client(aeng, body)
    finally:
        aeng.shutdown()

    async def refused(client: AgentClient) -> None:
        code, message = await rpc_status(client.generate_done(prompt_token_ids=[5, 6, 7], **greedy))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "thinking_token_budget" in message, (code, message)

    plain = make_engine(ARCH)
    try:
        run_with_client(plain, refused)
    finally:
        plain.shutdown()
