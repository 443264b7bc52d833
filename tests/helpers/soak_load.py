"""A seeded mixed load on a live server (tests/test_soak.py): several concurrent clients over the
official `openai` and `anthropic` clients, raw HTTP and the gRPC AgentClient, with aborts, disconnects, expiring
deadlines and adapters loaded and unloaded mid-run. Every client tallies what it saw, so the
server's counters can be checked against it; any outcome outside the expected set is recorded as a
failure (an HTTP 5xx, an unexpected gRPC status, a tool call that does not parse)."""

from __future__ import annotations

import asyncio
import collections
import json
import random
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Optional

import anthropic
import grpc
import httpx
import openai

from agentserve.adapters.client import AgentClient

TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
                   "required": ["city"], "additionalProperties": False}}}
ANTHROPIC_TOOL = {"name": TOOL["function"]["name"], "description": TOOL["function"]["description"],
                  "input_schema": TOOL["function"]["parameters"]}
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                                                "maximum": 99}},
          "required": ["ok", "n"], "additionalProperties": False}
WORDS = "alpha beta gamma delta echo fox golf hotel india juliet kilo lima mike nova oscar papa".split()
# A name not loaded at the moment, or unloaded meanwhile: 404 / NOT_FOUND, never a 500.
EXPECTED_GRPC = {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED, grpc.StatusCode.NOT_FOUND}


@dataclass
class Tally:
    """What the clients saw. `completed`: engine sequences that ran to a finish (stop or length) and
    whose usage the client read; the token counts are those usages' (session turns report the whole
    history as prompt tokens, so the counts cover only stateless requests)."""
    completed_stateless: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ops: collections.Counter = field(default_factory=collections.Counter)
    expected_errors: collections.Counter = field(default_factory=collections.Counter)
    failures: list[str] = field(default_factory=list)

    def usage(self, prompt: int, completion: int, sequences: int = 1) -> None:
        self.completed_stateless += sequences
        self.prompt_tokens += prompt * sequences  # vLLM's prompt_tokens_total counts each of n's prefills
        self.completion_tokens += completion


@dataclass
class Server:
    http_url: str
    grpc_address: str
    adapters: dict[str, str]   # name -> PEFT dir, loaded at start
    spare_adapter: str         # a PEFT dir the load/unload client loads as "hot" and unloads again
    aborts: bool = True        # the mix includes disconnects, cancels and deadlines
    stateless_only: bool = False  # only requests whose usage the tally counts (no sessions, no Responses)


def _prompt(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


class Client:
    """One concurrent client: `ops` operations drawn from the mix with its own seeded RNG."""

    def __init__(self, server: Server, tally: Tally, seed: int) -> None:
        self.server = server
        self.tally = tally
        self.rng = random.Random(seed)
        self.oai = openai.AsyncOpenAI(base_url=server.http_url + "/v1", api_key="x", max_retries=0, timeout=120)
        self.claude = anthropic.AsyncAnthropic(base_url=server.http_url, api_key="x", max_retries=0, timeout=120)
        self.http = httpx.AsyncClient(base_url=server.http_url, timeout=120)
        self.agent = AgentClient(server.grpc_address)

    async def close(self) -> None:
        await self.oai.close()
        await self.claude.close()
        await self.http.aclose()
        await self.agent.close()

    def model(self) -> str:
        return self.rng.choice(["base", "base", *self.server.adapters, "hot"])

    async def run(self, ops: int) -> None:
        mix: list[tuple[Callable[[], Awaitable[None]], int]] = [
            (self.chat, 4), (self.completion, 2), (self.tool_call, 2), (self.json_schema, 2), (self.generate, 2),
            (self.long_completion, 1), (self.messages, 2)]
        if not self.server.stateless_only:
            mix += [(self.responses_chain, 2), (self.session, 3)]
        if self.server.aborts:
            mix += [(self.http_disconnect, 2), (self.turn_cancel, 2), (self.deadline, 1)]
        fns, weights = zip(*mix)
        # Every kind once (in a shuffled order), then a weighted draw: each round covers the whole mix.
        plan = self.rng.sample(fns, len(fns))
        plan += self.rng.choices(fns, weights, k=max(0, ops - len(plan)))
        for op in plan:
            self.tally.ops[op.__name__] += 1
            try:
                await op()
            except (openai.NotFoundError, anthropic.NotFoundError) as e:  # the "hot" adapter was unloaded meanwhile
                self._expect("http404", "hot" in str(e) or "adapter" in str(e).lower(), str(e))
            except grpc.aio.AioRpcError as e:
                self._expect(f"grpc:{e.code().name}", e.code() in EXPECTED_GRPC, f"{op.__name__}: {e.code()} {e.details()}")
            except Exception as e:  # noqa: BLE001 - every other outcome is a finding
                self.tally.failures.append(f"{op.__name__}: {type(e).__name__}: {e}")

    def _expect(self, kind: str, ok: bool, detail: str) -> None:
        if ok:
            self.tally.expected_errors[kind] += 1
        else:
            self.tally.failures.append(detail)

    # --- HTTP ---------------------------------------------------------------------------------------
    async def chat(self) -> None:
        n = self.rng.choice([1, 1, 2])
        kw: dict[str, Any] = dict(model=self.model(), messages=[{"role": "user", "content": _prompt(self.rng, 6)}],
                                  max_tokens=self.rng.randint(3, 10), temperature=self.rng.choice([0.0, 0.8]),
                                  seed=self.rng.randint(0, 99), n=n)
        if self.rng.random() < 0.5:
            kw.update(logprobs=True, top_logprobs=2)
        if self.rng.random() < 0.5:
            stream = await self.oai.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw)
            usage = None
            async for chunk in stream:
                usage = chunk.usage or usage
        else:
            usage = (await self.oai.chat.completions.create(**kw)).usage
        assert usage is not None
        self.tally.usage(usage.prompt_tokens, usage.completion_tokens, n)

    async def completion(self) -> None:
        r = await self.oai.completions.create(model=self.model(), prompt=_prompt(self.rng, 8), max_tokens=6,
                                              temperature=0.0, logprobs=2, echo=self.rng.random() < 0.3)
        assert r.usage is not None
        self.tally.usage(r.usage.prompt_tokens, r.usage.completion_tokens)

    async def long_completion(self) -> None:
        """Two long sequences: with the other clients' they outgrow the small pool (preemption)."""
        r = await self.oai.completions.create(model=self.model(), prompt=_prompt(self.rng, 8), max_tokens=120, n=2,
                                              temperature=1.0, seed=self.rng.randint(0, 99),
                                              extra_body={"ignore_eos": True})
        assert r.usage is not None
        self.tally.usage(r.usage.prompt_tokens, r.usage.completion_tokens, 2)

    async def tool_call(self) -> None:
        r = await self.oai.chat.completions.create(
            model=self.model(), messages=[{"role": "user", "content": "weather in " + _prompt(self.rng, 2)}],
            tools=[TOOL], tool_choice="required", max_tokens=40, temperature=0.7, seed=self.rng.randint(0, 99))
        calls = r.choices[0].message.tool_calls
        if r.choices[0].finish_reason == "tool_calls":
            assert calls and all(isinstance(json.loads(c.function.arguments), dict) for c in calls), calls
        assert r.usage is not None
        self.tally.usage(r.usage.prompt_tokens, r.usage.completion_tokens)

    async def json_schema(self) -> None:
        fmt: Any = {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA, "strict": True}}
        r = await self.oai.chat.completions.create(
            model=self.model(), messages=[{"role": "user", "content": _prompt(self.rng, 5)}],
            response_format=fmt, max_tokens=30, temperature=0.0)
        if r.choices[0].finish_reason == "stop":
            assert set(json.loads(r.choices[0].message.content or "")) == {"ok", "n"}
        assert r.usage is not None
        self.tally.usage(r.usage.prompt_tokens, r.usage.completion_tokens)

    async def messages(self) -> None:
        """Anthropic's Messages API, streamed or not, calling a tool or not."""
        kw: dict[str, Any] = dict(model=self.model(), max_tokens=self.rng.randint(3, 10),
                                  messages=[{"role": "user", "content": _prompt(self.rng, 6)}],
                                  extra_body={"temperature": self.rng.choice([0.0, 0.8])})
        if self.rng.random() < 0.4:
            kw.update(tools=[ANTHROPIC_TOOL], tool_choice={"type": "any"}, max_tokens=40)
        if self.rng.random() < 0.5:
            async with self.claude.messages.stream(**kw) as stream:
                message = await stream.get_final_message()
        else:
            message = await self.claude.messages.create(**kw)
        if message.stop_reason == "tool_use":
            assert all(isinstance(b.input, dict) for b in message.content if b.type == "tool_use"), message
        u = message.usage  # Anthropic's input_tokens leave out the prefix cache's hits
        self.tally.usage(u.input_tokens + (u.cache_read_input_tokens or 0), u.output_tokens)

    async def responses_chain(self) -> None:
        model, previous, ids = self.model(), None, []
        try:
            for _ in range(self.rng.randint(1, 3)):
                kw: dict[str, Any] = {} if previous is None else {"previous_response_id": previous}
                r = await self.oai.responses.create(model=model, input=_prompt(self.rng, 4), max_output_tokens=5,
                                                    temperature=0.0, **kw)
                previous = r.id
                ids.append(r.id)
        finally:
            if self.rng.random() < 0.8:  # the rest stay until their sessions' TTL (the soak's idle wait)
                for rid in ids:
                    await self.oai.responses.delete(rid)

    async def http_disconnect(self) -> None:
        """Streams a long completion (or message) and drops the connection after the first chunks."""
        body: dict[str, Any] = {"model": self.model(), "max_tokens": 200, "stream": True, "ignore_eos": True}
        if self.rng.random() < 0.7:
            path = "/v1/completions"
            body.update(prompt=_prompt(self.rng, 6), n=self.rng.choice([1, 2]))
        else:
            path = "/v1/messages"
            body.update(messages=[{"role": "user", "content": _prompt(self.rng, 6)}])
        async with self.http.stream("POST", path, json=body) as r:
            if r.status_code == 404:
                self.tally.expected_errors["http404"] += 1
                return
            assert r.status_code == 200, r.status_code
            seen = 0
            async for line in r.aiter_lines():
                seen += line.startswith("data:")
                if seen >= self.rng.randint(1, 3):
                    break

    # --- gRPC ---------------------------------------------------------------------------------------
    async def session(self) -> None:
        adapter = self.rng.choice(["", "", *self.server.adapters])
        s = await self.agent.create_session([{"role": "system", "content": "Be brief. " + _prompt(self.rng, 20)}],
                                            tools=[TOOL], adapter=adapter, ttl_seconds=self.rng.choice([2.0, 600.0]))
        forks = []
        try:
            for i in range(self.rng.randint(1, 3)):
                await s.run_turn([{"role": "user", "content": _prompt(self.rng, 5)}], max_tokens=6, temperature=0.0,
                                 tool_choice=self.rng.choice(["", "auto"]))
                if self.rng.random() < 0.4:
                    f = await s.fork()
                    forks.append(f)
                    await f.run_turn([{"role": "user", "content": _prompt(self.rng, 3)}], max_tokens=4, temperature=0.9)
        finally:
            if self.rng.random() < 0.8:  # the others expire (short TTL) or are closed by the soak's cleanup
                for x in [s, *forks]:
                    await x.close()

    async def generate(self) -> None:
        done = await self.agent.generate_done(_prompt(self.rng, 7), max_tokens=self.rng.randint(2, 8),
                                              temperature=0.5, seed=self.rng.randint(0, 99),
                                              adapter=self.rng.choice(["", *self.server.adapters]))
        self.tally.usage(done.usage.prompt_tokens, done.usage.completion_tokens)

    async def turn_cancel(self) -> None:
        s = await self.agent.create_session([{"role": "user", "content": _prompt(self.rng, 10)}])
        try:
            events = 0
            async for _ in s.turn(max_tokens=200, ignore_eos=True, temperature=0.0):
                events += 1
                if events >= self.rng.randint(1, 4):
                    break  # leaving the iteration cancels the turn on the server
            try:
                await s.run_turn([{"role": "user", "content": "again"}], max_tokens=3)
            except grpc.aio.AioRpcError as e:
                # The server may not have seen the cancel yet (gRPC delivers it to the handler
                # asynchronously): the session must then come free on its own, promptly.
                if e.code() != grpc.StatusCode.FAILED_PRECONDITION:
                    raise
                self.tally.expected_errors["busy_right_after_cancel"] += 1
                for _ in range(100):
                    if not (await s.refresh()).busy:
                        break
                    await asyncio.sleep(0.05)
                await s.run_turn([{"role": "user", "content": "again"}], max_tokens=3)
        finally:
            await s.close()

    async def deadline(self) -> None:
        timeout = self.rng.choice([0.001, 0.05, 0.3])
        await self.agent.generate_done(_prompt(self.rng, 12), max_tokens=300, ignore_eos=True, timeout=timeout)


async def adapter_churn(server: Server, tally: Tally, stop: asyncio.Event, seed: int) -> None:
    """Loads the spare adapter as "hot" and unloads it (drained), over HTTP and gRPC in turn."""
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=server.http_url, timeout=60) as http, AgentClient(server.grpc_address) as agent:
        while not stop.is_set():
            if rng.random() < 0.5:
                r = await http.post("/v1/load_lora_adapter", json={"lora_name": "hot", "lora_path": server.spare_adapter})
                ok = r.status_code == 200
            else:
                ok = bool(await agent.load_adapter("hot", server.spare_adapter, replace=True))
            if not ok:
                tally.failures.append(f"load hot: {r.status_code} {r.text}")
            tally.ops["adapter_load"] += 1
            await asyncio.sleep(rng.uniform(0.2, 1.0))
            r = await http.post("/v1/unload_lora_adapter", json={"lora_name": "hot", "drain": True})
            if r.status_code != 200:
                tally.failures.append(f"unload hot: {r.status_code} {r.text}")
            tally.ops["adapter_unload"] += 1
            await asyncio.sleep(rng.uniform(0.1, 0.5))


async def drive(server: Server, seed: int, clients: int, ops: int, tally: Optional[Tally] = None) -> Tally:
    """Runs `clients` concurrent clients of `ops` operations each, beside the adapter churn."""
    tally = tally or Tally()
    stop = asyncio.Event()
    churn = asyncio.create_task(adapter_churn(server, tally, stop, seed * 1000 + 999))
    runners = [Client(server, tally, seed * 1000 + i) for i in range(clients)]
    try:
        await asyncio.gather(*(c.run(ops) for c in runners))
    finally:
        stop.set()
        await churn
        for c in runners:
            await c.close()
    return tally
