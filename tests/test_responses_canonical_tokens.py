"""A continuation of a stored response (previous_response_id) or of a conversation prompts the model with the
tokens a client re-sending the whole history gets: the history rendered and tokenized from scratch. The session
behind a response holds the model's own tokens, which may split the reply's text otherwise than the tokenizer
does; such a continuation runs on a new session (it ran on the held tokens, so the first of two identical requests
got another prompt and another greedy reply than the second)."""

from __future__ import annotations

from typing import Any

from transformers import AutoTokenizer

from agentserve.testing import tiny_model_cached
from helpers.live_server import live_openai

QUESTION = "Tell me a story"  # the tiny qwen2's greedy 12-token reply re-tokenizes to 13 tokens


def _continue(client: Any, **fields: Any) -> tuple[int, str]:
    r = client.responses.create(model="m", temperature=0, max_output_tokens=8, **fields)
    return r.usage.input_tokens, r.output_text


def test_continuations_prompt_as_the_history_re_sent() -> None:
    with live_openai("qwen2", max_model_len=512) as client:
        first = client.responses.create(model="m", input=QUESTION, temperature=0, max_output_tokens=12)
        # The precondition: the model's own tokens are not how its tokenizer splits the reply's text.
        tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_cached("qwen2")))
        assert len(tokenizer.encode(first.output_text, add_special_tokens=False)) != first.usage.output_tokens
        history = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": first.output_text},
                   {"role": "user", "content": "And then?"}]
        a = _continue(client, previous_response_id=first.id, input="And then?")
        b = _continue(client, previous_response_id=first.id, input="And then?")
        stateless = _continue(client, input=history, store=False)
        assert a == b == stateless

        conversation = client.conversations.create(items=[{"type": "message", "role": "user", "content": QUESTION}])
        client.responses.create(model="m", conversation=conversation.id, input=[], temperature=0, max_output_tokens=12)
        in_conversation = _continue(client, conversation=conversation.id, input="And then?")
        assert in_conversation == stateless
