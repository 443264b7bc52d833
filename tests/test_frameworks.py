"""Agent frameworks, unmodified and installed from the registry (the dev extras), against a live
server on a tiny model: the requests their default and typed paths send must work (issue #14).

- the OpenAI Agents SDK on its default model path (the Responses API): a function tool, an
  `output_type` (with tools beside it), and a streamed run;
- pydantic-ai with tools and `NativeOutput` (Chat Completions: tools + response_format json_schema);
- LangChain's `bind_tools(..., response_format=...)` and `with_structured_output`;
- litellm with tools and a response_format.

A random-weight model prefers calling tools to answering, so the typed loops disable the tool once
it has been called (each framework's own per-tool switch): the first request carries tools together
with the output schema, the last one gets the typed answer. Each test skips, naming the package,
when its framework is not installed.
"""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any, Iterator, Literal

import pytest
from pydantic import BaseModel, Field

from agentserve.adapters.openai.app import create_app
from agentserve.adapters.openai.server import ServerThread
from agentserve.config import EngineConfig
from agentserve.engine.async_engine import AsyncEngine
from agentserve.engine.engine import Engine
from agentserve.testing.tiny import tiny_model_cached

MODEL = "tiny-qwen2"  # no '/': the Agents SDK reads one as a provider prefix
CITIES = ("Paris", "Rome")


class Verdict(BaseModel):
    sunny: bool


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    config = EngineConfig.from_kwargs(str(tiny_model_cached("qwen2")), device="cpu", num_blocks=1024,
                                      served_model_name=MODEL, max_model_len=2048)
    aeng = AsyncEngine(Engine(config))
    server = ServerThread(create_app(aeng, config)).start()
    yield server.url + "/v1"
    server.stop()
    aeng.shutdown()


# --- the OpenAI Agents SDK (Responses API) ---------------------------------------------------------------
@pytest.fixture()
def agents_sdk(base_url: str) -> Any:
    agents = pytest.importorskip("agents", reason="openai-agents is not installed (pip install -e '.[dev]')")
    from openai import AsyncOpenAI

    agents.set_tracing_disabled(True)
    agents.set_default_openai_api("responses")  # the default; said explicitly, as it is what is tested
    agents.set_default_openai_client(AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0),
                                     use_for_tracing=False)
    return agents


def _weather_tool(agents: Any, calls: list[str], once: bool = False, result: Any = None) -> Any:
    def get_weather(city: Literal["Paris", "Rome"]) -> Any:
        """The current weather of a city."""
        calls.append(city)
        return f"sunny in {city}" if result is None else result

    enabled = (lambda ctx, agent: not calls) if once else True
    return agents.function_tool(get_weather, is_enabled=enabled)



def _weather_agent(agents: Any, calls: list[str]) -> Any:
    """An agent that must call get_weather once and stops with the tool's result as its output."""
    return agents.Agent(
        name="weather", instructions="Call get_weather.", model=MODEL, tools=[_weather_tool(agents, calls)],
        tool_use_behavior="stop_on_first_tool",
        model_settings=agents.ModelSettings(tool_choice="required", parallel_tool_calls=False, max_tokens=64,
                                            temperature=0))

def test_agents_sdk_function_tool(agents_sdk: Any) -> None:
    calls: list[str] = []
    agent = _weather_agent(agents_sdk, calls)
    result = agents_sdk.Runner.run_sync(agent, "What is the weather in Paris?")
    assert len(calls) == 1 and calls[0] in CITIES
    assert result.final_output == f"sunny in {calls[0]}"
    assert result.raw_responses[0].response_id.startswith("resp_")  # it went over /v1/responses


def test_agents_sdk_tool_with_a_set_parameter(agents_sdk: Any) -> None:
    """A `set[str]` parameter is `"uniqueItems": true` in the tool's schema, which no grammar backend
    enforces: the request was a 400 and the run ended; the call is now constrained without it."""
    received: list[set[str]] = []

    def tag_city(city: Literal["Paris", "Rome"],
                 tags: Annotated[set[Literal["sunny", "rainy", "windy"]], Field(max_length=3)]) -> str:
        """Tag a city."""
        received.append(tags)
        return "tagged"

    agent = agents_sdk.Agent(
        name="tagger", instructions="Call tag_city.", model=MODEL, tools=[agents_sdk.function_tool(tag_city)],
        tool_use_behavior="stop_on_first_tool",
        model_settings=agents_sdk.ModelSettings(tool_choice="required", parallel_tool_calls=False, max_tokens=96,
                                                temperature=0))
    result = agents_sdk.Runner.run_sync(agent, "Tag Paris as sunny.")
    assert result.final_output == "tagged"
    assert len(received) == 1 and isinstance(received[0], set) and received[0] <= {"sunny", "rainy", "windy"}


def test_agents_sdk_output_type_with_tools(agents_sdk: Any) -> None:
    """Agent(tools=..., output_type=...): the first request has tools and text.format json_schema
    together; the model calls the tool, then (the tool switched off) answers in the schema."""
    calls: list[str] = []
    agent = agents_sdk.Agent(
        name="typed", instructions="Check the weather, then answer.", model=MODEL, output_type=Verdict,
        tools=[_weather_tool(agents_sdk, calls, once=True)],
        model_settings=agents_sdk.ModelSettings(parallel_tool_calls=False, max_tokens=64, temperature=0))
    result = agents_sdk.Runner.run_sync(agent, "Is it sunny in Paris?", max_turns=4)
    assert isinstance(result.final_output, Verdict)
    assert len(result.raw_responses) == len(calls) + 1
    # Without tools: the typed answer alone.
    plain = agents_sdk.Agent(name="plain", instructions="Answer.", model=MODEL, output_type=Verdict,
                             model_settings=agents_sdk.ModelSettings(max_tokens=32, temperature=0))
    assert isinstance(agents_sdk.Runner.run_sync(plain, "Is it sunny?").final_output, Verdict)


def test_agents_sdk_streamed(agents_sdk: Any) -> None:
    calls: list[str] = []
    agent = _weather_agent(agents_sdk, calls)

    async def run() -> tuple[Any, list[str]]:
        streamed = agents_sdk.Runner.run_streamed(agent, "Weather in Rome?")
        types = [ev.data.type async for ev in streamed.stream_events() if ev.type == "raw_response_event"]
        return streamed.final_output, types

    final, types = asyncio.run(run())
    assert final == f"sunny in {calls[0]}"
    assert types[0] == "response.created" and types[-1] == "response.completed"
    for t in ("response.output_item.added", "response.function_call_arguments.delta",
              "response.function_call_arguments.done", "response.output_item.done"):
        assert t in types


def test_agents_sdk_continues_with_previous_response_id(agents_sdk: Any) -> None:
    """Server-side conversation state: the second run sends only its new input with the first run's
    last response id, and the earlier conversation's KV is reused (the resident session's, or, where the model's
    own reply tokens are not how the tokenizer splits its text, the prefix cache's full pages of it)."""
    # A typed answer ends by itself (the SDK refuses an incomplete response; random text would run on).
    agent = agents_sdk.Agent(name="chat", instructions="Be brief.", model=MODEL, output_type=Verdict,
                             model_settings=agents_sdk.ModelSettings(max_tokens=32, temperature=0))
    first = agents_sdk.Runner.run_sync(agent, "Hello there.")
    second = agents_sdk.Runner.run_sync(agent, "And again?", previous_response_id=first.last_response_id)
    before, after = first.raw_responses[-1].usage, second.raw_responses[-1].usage
    assert after.input_tokens_details.cached_tokens >= before.input_tokens // 16 * 16  # 16-token pages
    assert after.input_tokens > after.input_tokens_details.cached_tokens


# --- pydantic-ai ----------------------------------------------------------------------------------------
def test_pydantic_ai_tools_and_native_output(base_url: str) -> None:
    pytest.importorskip("pydantic_ai", reason="pydantic-ai-slim is not installed (pip install -e '.[dev]')")
    from pydantic_ai import Agent, NativeOutput, RunContext, Tool
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider
    from pydantic_ai.tools import ToolDefinition

    calls: list[str] = []

    def get_weather(city: Literal["Paris", "Rome"]) -> str:
        """The current weather of a city."""
        calls.append(city)
        return f"sunny in {city}"

    async def only_once(ctx: RunContext[None], tool_def: ToolDefinition) -> ToolDefinition | None:
        return None if calls else tool_def

    model = OpenAIChatModel(MODEL, provider=OpenAIProvider(base_url=base_url, api_key="unused"))
    agent = Agent(model, output_type=NativeOutput(Verdict), tools=[Tool(get_weather, prepare=only_once)],
                  model_settings={"temperature": 0.0, "max_tokens": 64, "parallel_tool_calls": False})
    result = agent.run_sync("Is it sunny in Paris?")
    assert isinstance(result.output, Verdict)
    assert all(c in CITIES for c in calls)
    replies = [m for m in result.all_messages() if m.kind == "response"]
    assert len(replies) == len(calls) + 1  # a call, then (the tool switched off) the typed answer


# --- LangChain ------------------------------------------------------------------------------------------
def test_langchain_bind_tools_with_response_format(base_url: str) -> None:
    pytest.importorskip("langchain_openai", reason="langchain-openai is not installed (pip install -e '.[dev]')")
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: Literal["Paris", "Rome"]) -> str:
        """The current weather of a city."""
        return f"sunny in {city}"

    llm = ChatOpenAI(model=MODEL, base_url=base_url, api_key="unused", temperature=0, max_tokens=64,  # type: ignore[arg-type]
                     max_retries=0)
    bound = llm.bind_tools([get_weather], response_format=Verdict, strict=True, parallel_tool_calls=False)
    reply = bound.invoke("Is it sunny in Paris?")
    if reply.tool_calls:
        assert reply.tool_calls[0]["name"] == "get_weather" and reply.tool_calls[0]["args"]["city"] in CITIES
    else:
        assert isinstance(reply.additional_kwargs["parsed"], Verdict)
    structured = llm.with_structured_output(Verdict)  # method="json_schema": response_format on its own
    assert isinstance(structured.invoke("Is it sunny in Paris?"), Verdict)


# --- litellm --------------------------------------------------------------------------------------------
def test_litellm_tools_with_response_format(base_url: str) -> None:
    litellm = pytest.importorskip("litellm", reason="litellm is not installed (pip install -e '.[dev]')")
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "enum": list(CITIES)}}, "required": ["city"],
        "additionalProperties": False}}}]
    response_format = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": Verdict.model_json_schema()}}
    reply = litellm.completion(model=f"openai/{MODEL}", api_base=base_url, api_key="unused", tools=tools,
                               response_format=response_format, parallel_tool_calls=False, max_tokens=64,
                               temperature=0, messages=[{"role": "user", "content": "Is it sunny in Paris?"}])
    message = reply.choices[0].message
    if message.tool_calls:
        assert json.loads(message.tool_calls[0].function.arguments)["city"] in CITIES
    else:
        Verdict.model_validate_json(message.content)
