"""agent_loop.py's `responses` mode: the same agents over the OpenAI Responses API (/v1/responses),
each turn continuing the previous one with `previous_response_id`, against the gRPC `sessions` mode.

The Responses API takes text through the chat template (no raw token ids), so when `responses` is
among the modes the workload is text for both: the preamble as instructions (the session's system
message), the task and each tool result as a user message, of about the token counts the raw
workload draws. Generated lengths are fixed with vLLM's `ignore_eos`, as in the raw modes. Both
modes then render the same conversations: a loop prefills only its new message in either, so the
prefill per loop must match.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any, Optional

TEXT_MODES = ("sessions", "responses")
# Texts aim a little under the raw token counts: the chat template adds its markers to every message,
# and max_model_len was sized for the raw workload.
_TOKEN_SHARE = 0.85


class TextWorkload:
    """The raw workload's shape (same agents, turns, decisions, latencies) as text: "w123"-style
    words, as many as the tokenizer needs for about each raw part's token count."""

    def __init__(self, raw: Any, seed: int, tokenizer: Any) -> None:
        rng = random.Random(seed + 1)
        sample = " ".join(f"w{rng.randrange(1000)}" for _ in range(200))
        tokens_per_word = len(tokenizer.encode(sample, add_special_tokens=False)) / 200

        def text(tokens: int) -> str:
            words = max(1, int(tokens * _TOKEN_SHARE / tokens_per_word))
            return " ".join(f"w{rng.randrange(1000)}" for _ in range(words))

        self.preamble = text(len(raw.preamble))
        self.tasks = [text(len(t)) for t in raw.tasks]
        self.results = [[text(len(r)) for r in agent] for agent in raw.results]
        self.decisions, self.latency = raw.decisions, raw.latency


def text_workload(modes: list[str], raw: Any, seed: int, tokenizer: Any) -> Optional[TextWorkload]:
    """The text workload when the responses mode runs (None otherwise); SystemExit for what cannot."""
    if "responses" not in modes:
        return None
    if any(m not in TEXT_MODES for m in modes):
        raise SystemExit(f"the responses mode runs a text workload: combine it with {', '.join(TEXT_MODES)} only")
    if tokenizer is None or not tokenizer.chat_template:
        raise SystemExit("the responses mode needs a model with a tokenizer and a chat template")
    print("text workload (the Responses API takes text): sessions and responses send the same chat messages",
          flush=True)
    return TextWorkload(raw, seed, tokenizer)


def _record(agent: int, turn: int, start: float, prompt: int, cached: int, generated: int,
            ttft_ms: float = 0.0) -> dict[str, Any]:
    return {"agent": agent, "turn": turn, "latency_ms": (time.perf_counter() - start) * 1e3, "prompt": prompt,
            "cached": cached, "prefilled": prompt - cached, "generated": generated, "swapped_in": 0,
            "ttft_ms": ttft_ms, "queue_ms": 0.0}


async def run_agent_session_text(client: Any, w: TextWorkload, a: int, turns: int, hint_ms: float,
                                 rec: list) -> None:
    """The gRPC sessions mode on the text workload."""
    session = await client.create_session([{"role": "system", "content": w.preamble},
                                           {"role": "user", "content": w.tasks[a]}])
    try:
        for t in range(turns):
            new = [] if t == 0 else [{"role": "user", "content": w.results[a][t - 1]}]
            start = time.perf_counter()
            r = await session.run_turn(new, max_tokens=w.decisions[a][t], temperature=0.0, ignore_eos=True,
                                       expected_next_turn_ms=hint_ms if t < turns - 1 else 0.0)
            u = r.done.usage
            rec.append(_record(a, t, start, u.prompt_tokens, u.cached_tokens, u.completion_tokens,
                               r.done.timing.ttft_ms))
            if t < turns - 1:
                await asyncio.sleep(w.latency[a][t])
    finally:
        await session.close()


async def run_agent_responses(client: Any, model: str, w: TextWorkload, a: int, turns: int, rec: list) -> None:
    """The same agent over /v1/responses: each turn continues the previous response."""
    ids: list[str] = []
    try:
        for t in range(turns):
            start = time.perf_counter()
            r = await client.responses.create(
                model=model, instructions=w.preamble, input=w.tasks[a] if t == 0 else w.results[a][t - 1],
                previous_response_id=ids[-1] if ids else None, max_output_tokens=w.decisions[a][t],
                temperature=0.0, extra_body={"ignore_eos": True})
            ids.append(r.id)
            u = r.usage
            rec.append(_record(a, t, start, u.input_tokens, u.input_tokens_details.cached_tokens, u.output_tokens))
            if t < turns - 1:
                await asyncio.sleep(w.latency[a][t])
    finally:
        for response_id in ids:  # the last delete closes the session behind them
            await client.responses.delete(response_id)


async def run_text_mode(mode: str, handle: Any, w: TextWorkload, agents: int, turns: int, hint_ms: float,
                        rec: list) -> None:
    if mode == "sessions":
        from agentserve.adapters.client import AgentClient

        async with AgentClient(handle.address) as client:
            await asyncio.gather(*[run_agent_session_text(client, w, a, turns, hint_ms, rec) for a in range(agents)])
        return
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{handle.http_port}/v1", api_key="unused", max_retries=0,
                         timeout=3600)
    async with client:
        model = handle.async_engine.engine.model_name
        await asyncio.gather(*[run_agent_responses(client, model, w, a, turns, rec) for a in range(agents)])
