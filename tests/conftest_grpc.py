"""Helpers for the gRPC and session tests (imported by them; not a pytest conftest).

Each test runs its own asyncio loop (`run`) with a real grpc.aio server on 127.0.0.1:0 and the real
client; the engine behind it (tiny model, CPU) is shared by a test module to save start-up time.
References for exactness come from a separate engine, so a reference can never reuse a session's
(possibly wrong) pages by hash.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from typing import Any, AsyncIterator, Awaitable, Callable, Optional, Sequence, TypeVar

import grpc
import pytest

from agentserve.adapters.client import AgentClient
from agentserve.cache.kv_cache import bytes_per_block
from agentserve.config import EngineConfig
from agentserve.engine.async_engine import AsyncEngine
from agentserve.engine.engine import Engine
from agentserve.llm import LLM
from agentserve.model.arch_config import ArchConfig
from agentserve.sampling_params import SamplingParams
from agentserve.service.serve import ServerHandle, running_server
from agentserve.testing import tiny_model_cached

T = TypeVar("T")

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "read_file", "description": "Read a file",
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}},
]
SYSTEM = {"role": "system", "content": "You are a careful agent. Use the tools when they help; answer briefly."}
USER = [{"role": "user", "content": "Hello there."}]


def model_path(arch: str = "qwen2") -> str:
    return str(tiny_model_cached(arch))


def swap_gb_for(arch: str, slots: float, block_size: int = 16) -> float:
    """swap_space_gb that gives `slots` CPU swap pages for the tiny model of `arch` (fp32)."""
    import torch

    a = ArchConfig.from_dir(tiny_model_cached(arch))
    return (slots + 0.5) * bytes_per_block(a.num_layers, block_size, a.num_kv_heads, a.head_dim, torch.float32) / 2**30


def make_config(arch: str = "qwen2", **kw: Any) -> EngineConfig:
    opts: dict[str, Any] = dict(device="cpu", num_blocks=512, max_model_len=1024, dtype="float32")
    opts.update(kw)
    return EngineConfig.from_kwargs(model_path(arch), **opts)


def make_engine(arch: str = "qwen2", **kw: Any) -> AsyncEngine:
    return AsyncEngine(Engine(make_config(arch, **kw)))


def run(coro: Awaitable[T], timeout: float = 120.0) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


def run_with_client(aeng: AsyncEngine, body: Callable[[AgentClient], Awaitable[None]], timeout: float = 300.0) -> None:
    """Runs `body` with a client of a server over `aeng` (the engine stays up: its fixture owns it)."""
    async def main() -> None:
        async with serving(aeng) as (_, client):
            await body(client)

    run(main(), timeout=timeout)


def run_and_shutdown(aeng: AsyncEngine, body: Awaitable[None], timeout: float = 300.0) -> None:
    """Runs a test's body against the engine, then shuts the engine down, pass or fail."""
    try:
        run(body, timeout=timeout)
    finally:
        aeng.shutdown()


async def rpc_status(coro: Awaitable[Any]) -> tuple[grpc.StatusCode, str]:
    """The status code and details of the RPC error that `coro` must raise."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await coro
    return err.value.code(), err.value.details() or ""


async def turn_status(session: Any, messages: Any, **kw: Any) -> tuple[grpc.StatusCode, str]:
    """The status of a turn that must fail."""
    return await rpc_status(session.run_turn(messages, **kw))


@contextlib.asynccontextmanager
async def serving(aeng: AsyncEngine, *, api_key: Optional[str] = None, with_client: bool = True,
                  **kw: Any) -> AsyncIterator[tuple[ServerHandle, AgentClient]]:
    config = aeng.engine.config
    if api_key is not None:
        config = config.model_copy(update={"server": config.server.model_copy(update={"api_key": api_key})})
    async with running_server(config, async_engine=aeng, **kw) as handle:
        assert handle.address is not None
        client = AgentClient(handle.address, api_key=api_key)
        try:
            yield handle, client
        finally:
            await client.close()


@functools.lru_cache(maxsize=None)
def reference_llm(arch: str = "qwen2") -> LLM:
    return LLM(model_path(arch), device="cpu", dtype="float32", max_model_len=1024, num_blocks=8192)


def reference(prompts: Sequence[Sequence[int]], max_tokens: int, arch: str = "qwen2",
              tools: Optional[list[dict[str, Any]]] = None, **sampling: Any) -> list[list[int]]:
    """Greedy stateless generation over exactly these token sequences, on a separate engine (it
    never sees a session's pages). With tools, under the same tool-call grammar a session turn with
    those tools gets (tool_choice "auto"). Shorter prompts go first, in small batches, so that the
    longer ones (later turns of the same conversations) find them in the reference's prefix cache."""
    if tools:
        sampling.update(tools=tools, tool_choice="auto")
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, **sampling)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: dict[int, list[int]] = {}
    llm = reference_llm(arch)
    for start in range(0, len(order), 16):
        wave = order[start:start + 16]
        outs = llm.generate([list(prompts[i]) for i in wave], params)
        results.update((i, list(o.outputs[0].token_ids)) for i, o in zip(wave, outs))
    return [results[i] for i in range(len(prompts))]


def render(arch: str, messages: list[dict[str, Any]], tools: Any = None, gen: bool = True) -> str:
    tok = reference_llm(arch).tokenizer
    return tok.apply_chat_template(messages, tools=tools, add_generation_prompt=gen, tokenize=False)


def decode(arch: str, ids: Sequence[int]) -> str:
    return reference_llm(arch).tokenizer.decode(list(ids), skip_special_tokens=False)


def encode(arch: str, text: str) -> list[int]:
    return list(reference_llm(arch).tokenizer.encode(text, add_special_tokens=False))


def history_messages(info: Any) -> list[dict[str, Any]]:
    """SessionInfo.messages (include_messages) as template dicts."""
    import json

    out = []
    for m in info.messages:
        d: dict[str, Any] = {"role": m.role, "content": m.content or None}
        if m.tool_calls:
            d["tool_calls"] = [{"id": c.id, "type": "function",
                                "function": {"name": c.name, "arguments": json.loads(c.arguments)}}
                               for c in m.tool_calls]
        if m.tool_call_id:
            d["tool_call_id"] = m.tool_call_id
        if m.name:
            d["name"] = m.name
        out.append(d)
    return out
