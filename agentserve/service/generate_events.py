"""Generate's stream: text (and, on a reasoning model, reasoning) deltas and tool-call deltas, then the
final GenerateDone.

With a reasoning parser (--reasoning-parser) and chat `messages`, the reply is split as chat completions
split it: the thinking streams as `reasoning` deltas before the answer's `text`, and GenerateDone carries
it as reasoning_content, with usage.reasoning_tokens. A raw completion (`prompt` / `prompt_token_ids`) is
not split, as vLLM's /v1/completions never runs the reasoning parser: its text is the model's whole
output, markers included, and reasoning_tokens stays 0 (an output constraint still applies after the
thinking: that is the engine's, grammar/reasoning.py).
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Optional

from agentserve.chat.reasoning import ReplyReasoning
from agentserve.chat.reply import ReplyStream
from agentserve.engine.engine import Engine
from agentserve.outputs import RequestOutput
from agentserve.sampling_params import SamplingParams
from agentserve.service import agent_pb2 as pb
from agentserve.service.convert import generate_done_to_proto, text_deltas
from agentserve.sessions.types import ReplyParts, TextEvent


async def generate_events(engine: Engine, outs: AsyncIterator[RequestOutput], params: SamplingParams,
                          tools: Optional[list[dict[str, Any]]], *, chat: bool, return_token_ids: bool,
                          received: float) -> AsyncIterator[pb.GenerateEvent]:
    """`chat`: the prompt was rendered from messages (only then is the reasoning split)."""
    top_n = params.logprobs or 0
    reply: Optional[ReplyStream] = None
    thoughts: Optional[ReplyReasoning] = None
    async for out in outs:
        if reply is None:
            reply = ReplyStream(engine.tokenizer, out.prompt_token_ids, params, tools, engine.eos_token_ids,
                                engine.reasoning if chat else None)
            if chat and engine.reasoning is not None:
                thoughts = ReplyReasoning(engine.reasoning, out.prompt_token_ids)
        comp = out.outputs[0]
        for event in TextEvent.of_pieces(comp, reply.feed(out), thoughts):
            if isinstance(event, TextEvent):
                for kind, delta in text_deltas(event, return_token_ids, top_n):
                    yield pb.GenerateEvent(**{kind: delta})
            else:
                yield pb.GenerateEvent(tool_call=pb.ToolCallDelta(
                    index=event.index, id=event.id, name=event.name, arguments_delta=event.arguments_delta))
        if out.finished and (out.error or comp.finish_reason == "error"):
            raise out.failure("the request failed")
        if out.finished:
            if thoughts is not None:  # text held while undecided (only a marker's start)
                for kind, delta in text_deltas(TextEvent("", [], ReplyParts(*thoughts.finish())), return_token_ids, top_n):
                    yield pb.GenerateEvent(**{kind: delta})
            content, tool_calls = reply.final()
            yield pb.GenerateEvent(done=generate_done_to_proto(out, received, content, tool_calls, thoughts))
