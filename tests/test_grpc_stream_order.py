"""Generate's (and a session turn's) stream keeps the reply's order when one engine output carries several
tokens (a speculative run accepts up to k + 1 at once): text written before a tool call streams before the
call's first delta. The output used to be split into (all its text, all its calls) and the calls went
first, so a client accumulating the stream put the content after the call (HTTP kept the order)."""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator

import transformers

from agentserve.outputs import CompletionOutput, RequestOutput
from agentserve.sampling_params import SamplingParams
from agentserve.service.generate_events import generate_events
from conftest_grpc import TOOLS, model_path

REPLY = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\nDone.'


class _Engine:  # what generate_events reads of an engine
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.eos_token_ids, self.reasoning = tokenizer, {tokenizer.eos_token_id}, None


def test_text_before_a_call_in_one_output_streams_first() -> None:
    tok = transformers.AutoTokenizer.from_pretrained(model_path("qwen2"))
    ids = tok.encode(REPLY, add_special_tokens=False)
    cut = len(tok.encode(REPLY[:REPLY.index("Paris")], add_special_tokens=False))
    chunks = [ids[:2], ids[2:cut], ids[cut:]]  # the second holds text, the opener and the call's start
    prompt = tok.encode("weather in Paris?")

    async def outputs() -> AsyncIterator[RequestOutput]:
        sent: list[int] = []
        for i, chunk in enumerate(chunks):
            sent += chunk
            last = i == len(chunks) - 1
            yield RequestOutput(request_id="r", prompt=None, prompt_token_ids=prompt, finished=last, outputs=[
                CompletionOutput(index=0, text=tok.decode(sent), token_ids=list(sent), cumulative_logprob=None,
                                 logprobs=None, finish_reason="stop" if last else None, delta_text=tok.decode(chunk),
                                 delta_token_ids=list(chunk))])

    async def stream() -> list[tuple[str, Any]]:
        params = SamplingParams(temperature=0, max_tokens=100, tools=TOOLS, tool_choice="auto")
        events = []
        async for ev in generate_events(_Engine(tok), outputs(), params, TOOLS, chat=True, return_token_ids=True,
                                        received=time.monotonic()):
            kind = ev.WhichOneof("event")
            events.append((kind, getattr(ev, kind)))
        return events

    events = asyncio.run(stream())
    kinds = [k for k, _ in events]
    first_call = kinds.index("tool_call")
    text_before = "".join(e.text for k, e in events[:first_call] if k == "text")
    text_after = "".join(e.text for k, e in events[first_call:] if k == "text")
    assert text_before == "Let me check.\n" and text_after == "\nDone."
    assert events[first_call][1].name == "get_weather"
    streamed_ids = [t for k, e in events if k == "text" for t in e.token_ids]
    assert streamed_ids == ids  # every token once, in order
    done = events[-1][1]
    assert kinds[-1] == "done" and [c.name for c in done.tool_calls] == ["get_weather"]
