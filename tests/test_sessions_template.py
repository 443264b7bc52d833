"""A session's token history is append-consistent with each tiny model's chat template.

What "the same tokens" means here (see sessions/store.py): a session keeps the model's own tokens.
- History the client supplies (initial messages, and assistant/tool messages sent in a turn) is
  tokenized exactly as the whole rendered conversation is: the turn's prompt tokens equal
  tokenizing the template's rendering from scratch.
- After generated replies, prompts decode to exactly the template's rendering of the session's history
  plus the new messages, and the reply is what a stateless generate over the same prompt tokens gives.
  Prompts are append-only (turn k's prompt starts with turn k-1's prompt and reply tokens) whenever
  the template re-renders the reply as generated — always for ChatML (Qwen) and Llama 3; for the
  "[/INST] " + content templates (Llama 2, Mistral) only when the reply starts with a space, else the
  reply is re-tokenized and everything before it stays cached.
"""

from __future__ import annotations

from typing import Any

import pytest

from agentserve.testing import ARCHS
from conftest_grpc import (SYSTEM, TOOLS, decode, encode, history_messages, make_engine, reference, render, run,
                           serving)


def _call(cid: str, name: str, args: dict[str, Any]) -> dict[str, Any]:
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": args}}


CLIENT_HISTORY: list[dict[str, Any]] = [
    SYSTEM,
    {"role": "user", "content": "What's the weather in Paris? Also read notes.txt."},
    {"role": "assistant", "content": "Checking.", "tool_calls": [_call("call00001", "get_weather", {"city": "Paris"}),
                                                                 _call("call00002", "read_file", {"path": "notes.txt"})]},
    {"role": "tool", "tool_call_id": "call00001", "content": '{"temperature": 21, "conditions": "sunny"}'},
    {"role": "tool", "tool_call_id": "call00002", "content": "buy milk\n"},
]


@pytest.mark.parametrize("arch", ARCHS)
def test_session_tokens_follow_the_chat_template(arch: str) -> None:
    aeng = make_engine(arch)
    max_tokens = 6

    async def body() -> None:
        async with serving(aeng) as (handle, client):
            store = handle.store
            session = await client.create_session(CLIENT_HISTORY[:2], tools=TOOLS)
            info = await session.refresh(include_token_ids=True)
            assert list(info.token_ids) == encode(arch, render(arch, CLIENT_HISTORY[:2], TOOLS, gen=False))

            # Client-supplied assistant tool calls and tool results: token-identical to rendering from scratch.
            first = await session.run_turn(CLIENT_HISTORY[2:], max_tokens=max_tokens, temperature=0,
                                           return_token_ids=True)
            assert list(first.done.prompt_token_ids) == encode(arch, render(arch, CLIENT_HISTORY, TOOLS))

            prompts = [list(first.done.prompt_token_ids)]
            replies = [first.token_ids]
            for new in ([{"role": "user", "content": "Thanks. And in Oslo?"}],
                        [{"role": "tool", "tool_call_id": "call00003", "content": '{"temperature": -3}'}],
                        [{"role": "user", "content": "Summarise in one line. ü ∑ 🙂"}]):
                history = history_messages(await session.refresh(include_messages=True))
                rerenders = store.stats.rerenders
                r = await session.run_turn(new, max_tokens=max_tokens, temperature=0, return_token_ids=True)
                prompt = list(r.done.prompt_token_ids)
                # decoding the session's tokens gives the template's rendering of the conversation
                assert decode(arch, prompt) == render(arch, history + new, TOOLS)
                # append-only: the previous prompt and the model's own reply tokens are kept verbatim
                if store.stats.rerenders == rerenders:
                    # append-only: the previous prompt and the model's own reply tokens are kept verbatim
                    assert prompt[:len(prompts[-1]) + len(replies[-1])] == prompts[-1] + replies[-1]
                    assert r.done.usage.cached_tokens == len(prompts[-1]) + len(replies[-1]) - 1
                else:
                    # Llama 2 and Mistral write "[/INST] " + content: a reply that does not start with a
                    # space re-renders differently, so the reply is re-tokenized; the KV of everything
                    # before it is kept.
                    assert arch in ("llama", "mistral")
                    assert not decode(arch, replies[-1]).startswith(" ")
                    assert r.done.usage.cached_tokens >= len(prompts[-1])
                prompts.append(prompt)
                replies.append(r.token_ids)
            await session.close()
        # the replies are exactly a stateless generate's over the same tokens
        assert reference(prompts, max_tokens, arch=arch, tools=TOOLS) == replies

    try:
        run(body())
    finally:
        aeng.shutdown()
