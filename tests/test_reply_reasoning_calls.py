"""Sessions, the Responses API and gRPC Generate / Turn parse tool calls from a reasoning model's answer
only, as chat completions (and vLLM, whose tool parser reads the reasoning parser's content) do: a call the
model only drafts while thinking is no call, and the whitespace between `</think>` and a call is no text."""

from __future__ import annotations

from typing import Any

import pytest
from transformers import AutoTokenizer

from agentserve.chat.reasoning import ReasoningSpan, split_reasoning
from agentserve.chat.reply import CallDelta, ReplyStream
from agentserve.grammar.reasoning import ReasoningMarkers
from agentserve.outputs import CompletionOutput, RequestOutput
from agentserve.sampling_params import SamplingParams
from agentserve.testing.tiny import tiny_model_cached

TOOLS = [{"type": "function", "function": {"name": "get_weather",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'


@pytest.fixture(scope="module")
def tok() -> Any:
    return AutoTokenizer.from_pretrained(str(tiny_model_cached("qwen3")))


def _stream(tok: Any, reply: str, step: int, thinking_prompt: bool = True) -> tuple[list[Any], Any]:
    """Feeds the reply's tokens `step` at a time as the engine streams them; (pieces, final())."""
    prompt_text = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    if not thinking_prompt:  # Qwen3 with thinking off: the prompt closes an empty block
        prompt_text += "<think>\n\n</think>\n\n"
    prompt = tok.encode(prompt_text, add_special_tokens=False)
    ids = tok.encode(reply, add_special_tokens=False)
    stream = ReplyStream(tok, prompt, SamplingParams(max_tokens=200), TOOLS, [tok.eos_token_id],
                         ReasoningMarkers.for_tokenizer("qwen3", tok))
    pieces: list[Any] = []
    for i in range(0, len(ids), step):
        done = i + step >= len(ids)
        comp = CompletionOutput(0, "", ids[:i + step], None, None, "stop" if done else None, None, "", ids[i:i + step])
        pieces += stream.feed(RequestOutput("r", None, prompt, [comp], done))
    return pieces, stream.final()


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_a_call_drafted_while_thinking_is_no_call(tok: Any, step: int) -> None:
    reply = f"<think>\nI could call {CALL} but the user asked about Paris.\n</think>\n\nIt is sunny in Paris."
    pieces, (content, calls) = _stream(tok, reply, step)
    assert calls == [] and not any(isinstance(p, CallDelta) for p in pieces)
    assert content == reply and "".join(pieces) == reply  # the thinking passes through verbatim


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_a_call_after_the_thinking_is_parsed_and_no_whitespace_is_left_beside_it(tok: Any, step: int) -> None:
    reply = f"<think>\nlet me look it up\n</think>\n\n{CALL}"
    pieces, (content, calls) = _stream(tok, reply, step)
    assert [c["function"]["name"] for c in calls] == ["get_weather"]
    text = "".join(p for p in pieces if isinstance(p, str))
    # The streamed text is what the whole reply's split shows: the thinking, then no answer text (it was "\n\n",
    # which the Responses API streamed as a message item beside the call).
    assert split_reasoning("qwen3", text, True) == ("\nlet me look it up\n", "")
    assert content == "<think>\nlet me look it up\n</think>"


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_without_thinking_calls_are_parsed_from_the_first_character(tok: Any, step: int) -> None:
    pieces, (content, calls) = _stream(tok, f"Sure. {CALL}", step, thinking_prompt=False)
    assert [c["function"]["name"] for c in calls] == ["get_weather"] and content == "Sure. "


@pytest.mark.parametrize("text,in_reasoning,want", [
    ("<think>a</think>b", False, ("<think>a</think>", "b")),
    ("  <think>a</think>b", False, ("  <think>a</think>", "b")),
    ("a</think>b", True, ("a</think>", "b")),
    ("plain answer", False, ("", "plain answer")),
    ("<thi", False, ("", "<thi")),            # a start that never became the marker: the answer
    ("still thinking </thi", True, ("still thinking </thi", "")),  # cut short inside a marker's start
    ("<think>a</think></think>b", False, ("<think>a</think>", "</think>b")),
])
def test_the_span_split_of_any_delta_sizes(text: str, in_reasoning: bool, want: tuple[str, str]) -> None:
    for size in (1, 2, 3, 100):
        span = ReasoningSpan("qwen3", in_reasoning)
        chunks = [text[i:i + size] for i in range(0, len(text), size)]
        parts = [span.feed(c, final=(i == len(chunks) - 1)) for i, c in enumerate(chunks)]
        assert ("".join(p[0] for p in parts), "".join(p[1] for p in parts)) == want, size
