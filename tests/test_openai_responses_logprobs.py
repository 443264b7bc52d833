"""Output logprobs on the Responses API (`include: ["message.output_text.logprobs"]`, `top_logprobs`),
through the official `openai` client: the message's output_text carries one entry per generated token,
the same numbers a stateless chat completion over the same conversation gives, streamed with each
text delta; and which tokens carry them when a reply mixes text, tool calls and reasoning."""

from __future__ import annotations

import json
import math
from typing import Any, Iterator

import httpx
import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from agentserve.adapters.openai.logprobs import LogprobFormatter
from agentserve.adapters.openai.responses_logprobs import MessageLogprobs
from agentserve.outputs import Logprob
from agentserve.sessions.types import ReplyParts, TextEvent
from agentserve.testing.real import RealModelUnavailable, smollm2_cached
from helpers.live_server import live_openai

MODEL = "tiny-qwen2"
INSTRUCTIONS = "Answer in one short sentence."
QUESTION = "What is the capital of France?"
ASK = ["message.output_text.logprobs"]


class Live:
    def __init__(self, client: openai.OpenAI) -> None:
        self.client = client
        self.http = httpx.Client(base_url=str(client.base_url).removesuffix("v1/"), timeout=120)


@pytest.fixture(scope="module")
def live() -> Iterator[Live]:
    with live_openai("qwen2", served_model_name=MODEL, num_blocks=512, max_model_len=1024) as client:
        yield Live(client)


def _text_part(response: Response) -> Any:
    messages = [o for o in response.output if o.type == "message"]
    assert len(messages) == 1, response.output
    return messages[0].content[0]


def _create(live: Live, **kw: Any) -> Any:
    return live.client.responses.create(model=MODEL, instructions=INSTRUCTIONS, input=QUESTION, temperature=0,
                                        max_output_tokens=12, **kw)


def _chat_reference(live: Live, top: int) -> list[Any]:
    """The same conversation as a stateless chat completion: its per-token logprobs."""
    chat = live.client.chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": QUESTION}],
        temperature=0, max_tokens=12, logprobs=True, top_logprobs=top)
    assert chat.choices[0].logprobs is not None
    return list(chat.choices[0].logprobs.content or [])


def test_output_text_logprobs_match_a_stateless_chat_completion(live: Live) -> None:
    response = _create(live, include=ASK, top_logprobs=3)
    assert response.top_logprobs == 3
    part = _text_part(response)
    reference = _chat_reference(live, 3)
    assert part.logprobs is not None and len(part.logprobs) == len(reference) == response.usage.output_tokens
    for got, want in zip(part.logprobs, reference):
        assert got.token == want.token and got.bytes == want.bytes
        assert math.isclose(got.logprob, want.logprob, abs_tol=1e-4), (got, want)
        assert [t.token for t in got.top_logprobs] == [t.token for t in want.top_logprobs]
        assert len(got.top_logprobs) == 3
        # Greedy: the sampled token is the most likely one.
        assert got.top_logprobs[0].token == got.token and math.isclose(got.top_logprobs[0].logprob, got.logprob)
        assert all(a.logprob >= b.logprob for a, b in zip(got.top_logprobs, got.top_logprobs[1:]))
    # The entries spell the reply: the text, then the stop token when the reply ended on one.
    spelled = "".join(e.token for e in part.logprobs)
    assert spelled.startswith(part.text), (spelled, part.text)


def test_streamed_deltas_carry_the_same_logprobs(live: Live) -> None:
    whole = _text_part(_create(live, include=ASK, top_logprobs=2)).logprobs
    events = [TypeAdapter(ResponseStreamEvent).validate_python(e.model_dump())
              for e in _create(live, include=ASK, top_logprobs=2, stream=True)]
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert deltas and all(e.logprobs for e in deltas), "every text delta carries its tokens' logprobs"
    streamed = [lp for e in deltas for lp in e.logprobs]
    done = next(e for e in events if e.type == "response.output_text.done")
    final = _text_part(events[-1].response)  # type: ignore[union-attr]
    assert [e.token for e in final.logprobs] == [e.token for e in done.logprobs] == [e.token for e in whole]
    # The deltas carry all of them but the tokens that added no text at the end (the stop token).
    assert [e.token for e in streamed] == [e.token for e in whole][:len(streamed)]
    assert len(whole) - len(streamed) <= 1
    for a, b in zip(streamed, whole):
        assert math.isclose(a.logprob, b.logprob, abs_tol=1e-4)
        assert [t.token for t in a.top_logprobs or []] == [t.token for t in b.top_logprobs]


def test_which_fields_ask_for_logprobs(live: Live) -> None:
    plain = _text_part(_create(live))
    assert plain.logprobs == [], "none unless asked"
    only_include = _text_part(_create(live, include=ASK)).logprobs
    assert only_include and all(e.top_logprobs == [] for e in only_include)
    # A count of alternatives asks for logprobs too (not silently dropped for want of `include`).
    only_top = _create(live, top_logprobs=1)
    assert all(len(e.top_logprobs) == 1 for e in _text_part(only_top).logprobs) and _text_part(only_top).logprobs
    assert [e.token for e in only_include] == [e.token for e in _text_part(only_top).logprobs]
    stored = live.client.responses.retrieve(only_top.id)
    assert _text_part(stored).logprobs == _text_part(only_top).logprobs


@pytest.mark.real_model
def test_a_reply_that_ends_on_its_stop_token_counts_it_once() -> None:
    """The real SmolLM2 ends its replies on <|im_end|>, a token with no text: its entry goes with the
    message's last text, once (whole, streamed and stored alike), as a chat completion lists it."""
    try:
        model = str(smollm2_cached())
    except RealModelUnavailable as e:
        pytest.skip(str(e))
    with live_openai(model, max_model_len=1024) as client:
        kw: dict[str, Any] = dict(model="m", input="Say hello.", max_output_tokens=60, temperature=0, include=ASK,
                                  top_logprobs=1)
        whole = client.responses.create(**kw)
        assert whole.status == "completed", "the reply must end on its stop token, not at the limit"
        entries = _text_part(whole).logprobs
        assert len(entries) == whole.usage.output_tokens and entries[-1].token == "<|im_end|>"
        chat = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Say hello."}],
                                              max_tokens=60, temperature=0, logprobs=True, top_logprobs=1)
        assert chat.choices[0].logprobs is not None
        assert [e.token for e in entries] == [e.token for e in chat.choices[0].logprobs.content or []]
        events = list(client.responses.create(stream=True, **kw))
        done = next(e for e in events if e.type == "response.output_text.done")
        final = _text_part(events[-1].response)  # type: ignore[union-attr]
        assert [e.token for e in done.logprobs] == [e.token for e in final.logprobs] == [e.token for e in entries]
        assert [e.token for e in client.responses.retrieve(whole.id).output[0].content[0].logprobs] == \
            [e.token for e in entries]


def test_a_continuation_gets_its_own_tokens_logprobs(live: Live) -> None:
    first = _create(live, include=ASK)
    second = live.client.responses.create(model=MODEL, instructions=INSTRUCTIONS, previous_response_id=first.id,
                                          input="And of Italy?",
                                          temperature=0, max_output_tokens=8, include=ASK)
    assert second.usage.input_tokens_details.cached_tokens > 0  # it ran on the first one's session
    assert len(_text_part(second).logprobs) == second.usage.output_tokens


def test_output_with_logprobs_given_back_as_input_is_accepted(live: Live) -> None:
    # Clients that keep the conversation themselves (store: false, the Agents SDK) send the output items back.
    first = _create(live, include=ASK, top_logprobs=1, store=False)
    items = [o.model_dump(exclude_none=True) for o in first.output]
    assert items[0]["content"][0]["logprobs"]
    again = live.client.responses.create(model=MODEL, instructions=INSTRUCTIONS, temperature=0, max_output_tokens=4,
                                         input=[{"role": "user", "content": QUESTION}, *items,
                                                {"role": "user", "content": "Thanks."}])
    assert again.status in ("completed", "incomplete")


def test_bad_counts_are_refused(live: Live) -> None:
    for kw, param in ((dict(top_logprobs=-1), "top_logprobs"), (dict(top_logprobs=1.5), "top_logprobs"),
                      (dict(top_logprobs=True), "top_logprobs"), (dict(include=[ASK]), "include")):
        resp = live.http.post("/v1/responses", json={"model": MODEL, "input": "x", **kw})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == param, (kw, resp.text)


# --- which tokens go with the message (the follower alone, on events as sessions stream them) --------
def _event(text: str, ids: list[int], parts: Any = None) -> TextEvent:
    return TextEvent(text, ids, parts, [{i: Logprob(-0.5, 1, f"<{i}>")} for i in ids])


def test_follower_gives_held_tokens_to_the_next_text_and_none_to_calls_or_thinking() -> None:
    follower = MessageLogprobs(LogprobFormatter(None), 0)
    assert follower.text(_event("", [1])) == []                 # half a character: held
    assert [e["token"] for e in follower.text(_event("é", [2]))] == ["<1>", "<2>"]
    assert follower.text(_event("", [3, 4])) == []              # a tool call's opener, held back
    follower.tool_call()                                        # ... it was one: not the message's
    assert follower.text(_event("", [5])) == []                 # the call's arguments
    assert [e["token"] for e in follower.text(_event(" ok", [6]))] == ["<6>"]
    # A reasoning model: the thinking's tokens (split apart with their logprobs) carry none.
    lps = _event("", [7, 8]).logprobs
    assert lps is not None
    thinking = ReplyParts("hmm", "", (7,), (), (lps[0],), ())
    assert follower.text(TextEvent("hmm", [7], thinking, lps[:1])) == []
    split = ReplyParts("hm", "!", (7,), (8,), (lps[0],), (lps[1],))
    assert [e["token"] for e in follower.text(TextEvent("hm!", [7, 8], split, lps))] == ["<8>"]
    follower.text(_event("", [9]))                              # the stop token
    assert [e["token"] for e in follower.finish()] == ["<9>"]
    assert [e["token"] for e in follower.message] == ["<1>", "<2>", "<6>", "<8>", "<9>"]
    assert json.dumps(follower.message)  # JSON as it is sent


def test_follower_gives_nothing_after_a_final_call() -> None:
    follower = MessageLogprobs(LogprobFormatter(None), 0)
    follower.text(_event("Let me check.", [1, 2]))
    follower.tool_call()
    follower.text(_event("", [3]))
    assert follower.finish() == [] and [e["token"] for e in follower.message] == ["<1>", "<2>"]
