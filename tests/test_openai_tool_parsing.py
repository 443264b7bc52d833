"""The HTTP side of tool calls, independent of the model: a scripted engine emits a given output in
small random deltas (as a constrained model would), and the app must turn it into OpenAI's
`message.tool_calls` and streamed `delta.tool_calls` fragments, for each chat format (Hermes/Qwen
tags, Llama 3.1 JSON, Mistral [TOOL_CALLS]). The live-model path (grammar included) is in
test_openai_tools.py."""

from __future__ import annotations

import json
from pathlib import Path
import random
from typing import Any, AsyncIterator, Iterator, Optional, Sequence

import openai
import pytest

from agentserve.adapters.openai.app import create_app
from agentserve.adapters.openai.server import ServerThread
from agentserve.config import EngineConfig
from agentserve.engine.generation_defaults import GenerationDefaults
from agentserve.engine.loading import resolve_model
from agentserve.engine.metrics import EngineMetrics
from agentserve.outputs import CompletionOutput, RequestMetrics, RequestOutput
from agentserve.lora.interface import LoRAManager
from agentserve.sampling_params import SamplingParams
from agentserve.testing.tiny import tiny_model_cached

pytest.importorskip("agentserve.grammar.tool_parser")

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
        "required": ["city"]}}},
    {"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "properties": {"table": {"type": "string"}, "exact": {"type": "boolean"}}}}},
]
CALL_A = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
CALL_B = {"name": "lookup", "arguments": {"table": "users", "exact": True}}


def _hermes(calls: list[dict[str, Any]]) -> str:
    return "\n".join(f'<tool_call>\n{{"name": "{c["name"]}", "arguments": {json.dumps(c["arguments"])}}}\n</tool_call>'
                     for c in calls)


def _llama(calls: list[dict[str, Any]]) -> str:
    return "; ".join(f'{{"name": "{c["name"]}", "parameters": {json.dumps(c["arguments"])}}}' for c in calls)


def _mistral(calls: list[dict[str, Any]]) -> str:
    return "[TOOL_CALLS]" + json.dumps([{"name": c["name"], "arguments": c["arguments"]} for c in calls])


class _Pool:
    def __init__(self) -> None:
        self.num_blocks, self.block_size = 1024, 16
        self.num_used_blocks = self.query_tokens = self.hit_tokens = 0  # read by /metrics' live gauges


class _Scheduler:
    num_running = num_waiting = 0  # read by /metrics' live gauges


class ScriptedEngine:
    """Just enough of Engine for the app: tokenizer, limits, metrics, validate."""

    def __init__(self, arch: str) -> None:
        from transformers import AutoTokenizer

        self.model_path = tiny_model_cached(arch)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_path))
        self.model_name = f"scripted-{arch}"
        self.max_model_len = 4096
        self.pool = _Pool()
        self.scheduler = _Scheduler()
        self.pending_forks: dict[str, list[Any]] = {}  # n > 1 siblings not yet forked (none: n is 1 here)
        self.metrics = EngineMetrics(kv_blocks_total=1024)
        self.eos_token_ids = frozenset([self.tokenizer.eos_token_id])
        self.generation_defaults = GenerationDefaults()  # no generation_config.json defaults
        self.reasoning = None  # no reasoning parser
        self.config = EngineConfig.from_kwargs(str(self.model_path), served_model_name=self.model_name)
        self.arch, _ = resolve_model(self.config)  # the vocabulary bounds top_logprobs (--max-logprobs)
        self.lora_manager: Optional[LoRAManager] = None

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> SamplingParams:
        return params if params.max_tokens is not None else params.clone(max_tokens=16)


class _Adapters:
    """A LoRA manager that only names its adapters (routing is what is under test, not loading)."""

    def __init__(self, names: list[str]) -> None:
        self._names = names

    def names(self) -> list[str]:
        return list(self._names)

    def path_of(self, name: str) -> Optional[Path]:
        return Path("/adapters") / name if name in self._names else None

    def load(self, name: str, path: str) -> None:
        raise NotImplementedError

    def unload(self, name: str) -> None:
        raise NotImplementedError

    def activate(self, names: Sequence[Optional[str]]) -> list[int]:
        raise NotImplementedError


class ScriptedAsyncEngine:
    """generate() replays `self.script` (text) in random small deltas and records the params."""

    def __init__(self, engine: ScriptedEngine) -> None:
        self.engine = engine
        self.script = ""
        self.max_pending, self.num_pending = 100, 0
        self.last_params: Optional[SamplingParams] = None

    def is_running(self) -> bool:
        return True

    async def generate(self, request_id: str, prompt: Any, params: SamplingParams,
                       **kwargs: Any) -> AsyncIterator[RequestOutput]:
        self.last_params = params
        self.last_kwargs = kwargs
        rng = random.Random(len(self.script))
        text, pos, tokens = "", 0, []
        while pos < len(self.script):
            step = rng.randint(1, 4)
            delta = self.script[pos:pos + step]
            pos += step
            text += delta
            tokens.append(len(tokens))
            done = pos >= len(self.script)
            out = CompletionOutput(index=0, text=text, token_ids=list(tokens), cumulative_logprob=None, logprobs=None,
                                   finish_reason="stop" if done else None, delta_text=delta,
                                   delta_token_ids=[tokens[-1]])
            yield RequestOutput(request_id, None, list(prompt), [out], done,
                                RequestMetrics(0.0, 0.0, 0.0, 0.0, len(prompt), 0, len(prompt)))


class Scripted:
    def __init__(self, arch: str) -> None:
        self.engine = ScriptedEngine(arch)
        self.aeng = ScriptedAsyncEngine(self.engine)
        self.server = ServerThread(create_app(self.aeng, self.engine.config)).start()
        self.client = openai.OpenAI(base_url=self.server.url + "/v1", api_key="x", max_retries=0)


@pytest.fixture(scope="module", params=[("qwen2", _hermes), ("llama3", _llama), ("mistral", _mistral)],
                ids=["hermes", "llama3_json", "mistral"])
def scripted(request: pytest.FixtureRequest) -> Iterator[tuple[Scripted, Any]]:
    arch, render = request.param
    s = Scripted(arch)
    yield s, render
    s.server.stop()


def _ask(s: Scripted, stream: bool, **kw: Any) -> Any:
    return s.client.chat.completions.create(model=s.engine.model_name, messages=[{"role": "user", "content": "hi"}],
                                            tools=TOOLS, max_tokens=100, stream=stream, **kw)


def _reassemble(chunks: list[Any]) -> tuple[str, list[dict[str, Any]], str]:
    content, calls, finish = "", {}, ""
    for ch in chunks:
        for c in ch.choices:
            content += c.delta.content or ""
            for tc in c.delta.tool_calls or []:
                slot = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                if tc.id:
                    assert slot["id"] is None
                    slot["id"] = tc.id
                    assert tc.type == "function"
                slot["name"] += (tc.function.name or "") if tc.function else ""
                slot["arguments"] += (tc.function.arguments or "") if tc.function else ""
            finish = c.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


def _expect(calls: Any, wanted: list[dict[str, Any]]) -> None:
    got = [(c["name"] if isinstance(c, dict) else c.function.name,
            json.loads(c["arguments"] if isinstance(c, dict) else c.function.arguments)) for c in calls]
    assert got == [(w["name"], w["arguments"]) for w in wanted]


@pytest.mark.parametrize("calls", [[CALL_A], [CALL_A, CALL_B]], ids=["one", "two"])
def test_calls_whole_and_streamed(scripted: tuple[Scripted, Any], calls: list[dict[str, Any]]) -> None:
    s, render = scripted
    s.aeng.script = render(calls)
    if render is _mistral:
        s.aeng.script += "</s>"  # special tokens are kept for the [TOOL_CALLS] opener: EOS text too
    out = _ask(s, False, tool_choice="required")
    msg = out.choices[0].message
    assert not msg.content
    _expect(msg.tool_calls, calls)
    assert all(c.id and c.type == "function" for c in msg.tool_calls)
    assert out.choices[0].finish_reason == "tool_calls"
    content, streamed, finish = _reassemble(list(_ask(s, True, tool_choice="required")))
    assert content == "" and finish == "tool_calls"
    _expect(streamed, calls)
    assert all(c["id"] for c in streamed)
    # Named tool choice: OpenAI finishes with "stop".
    named = _ask(s, False, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert named.choices[0].finish_reason == "stop"
    assert s.aeng.last_params is not None and s.aeng.last_params.tool_choice == {
        "type": "function", "function": {"name": "get_weather"}}


def test_text_then_call_and_parallel_off(scripted: tuple[Scripted, Any]) -> None:
    s, render = scripted
    if render is _llama:
        pytest.skip("Llama 3.1 JSON calls are the whole output: no text before them")
    s.aeng.script = "Let me check that." + render([CALL_A, CALL_B])
    out = _ask(s, False)
    assert out.choices[0].message.content == "Let me check that."
    _expect(out.choices[0].message.tool_calls, [CALL_A, CALL_B])
    content, streamed, finish = _reassemble(list(_ask(s, True)))
    assert content == "Let me check that." and finish == "tool_calls"
    _expect(streamed, [CALL_A, CALL_B])
    # parallel_tool_calls=false: one call at most.
    one = _ask(s, False, parallel_tool_calls=False)
    _expect(one.choices[0].message.tool_calls, [CALL_A])
    _, streamed, _ = _reassemble(list(_ask(s, True, parallel_tool_calls=False)))
    _expect(streamed, [CALL_A])


def test_plain_text_and_tool_choice_none(scripted: tuple[Scripted, Any]) -> None:
    s, _ = scripted
    s.aeng.script = "No tools needed, the answer is 4."
    out = _ask(s, False)
    assert out.choices[0].message.content == s.aeng.script and not out.choices[0].message.tool_calls
    assert out.choices[0].finish_reason == "stop"
    content, streamed, finish = _reassemble(list(_ask(s, True)))
    assert content == s.aeng.script and streamed == [] and finish == "stop"
    s.aeng.script = _hermes([CALL_A])
    none = _ask(s, False, tool_choice="none")
    assert none.choices[0].message.content == s.aeng.script and not none.choices[0].message.tool_calls
    assert s.aeng.last_params is not None and not s.aeng.last_params.tools  # unconstrained


def test_tool_schema_dialects_and_unsupported_keywords(scripted: tuple[Scripted, Any]) -> None:
    s, render = scripted
    s.aeng.script = render([CALL_A])
    dialect = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "dict", "properties": {"city": {"type": "str"}, "unit": {"enum": ["c", "f"]}}}}}]
    out = s.client.chat.completions.create(model=s.engine.model_name, messages=[{"role": "user", "content": "hi"}],
                                           tools=dialect, tool_choice="required", max_tokens=50)
    assert out.choices[0].message.tool_calls
    bad = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "string", "not": {"const": "a"}}}}}}]
    with pytest.raises(openai.BadRequestError) as info:
        s.client.chat.completions.create(model=s.engine.model_name, messages=[{"role": "user", "content": "hi"}],
                                         tools=bad, max_tokens=5)
    err = info.value.body
    assert err["param"] == "tools[0].function.parameters.properties.x" and "'not'" in err["message"]


def test_adapter_models_route_to_lora(scripted: tuple[Scripted, Any]) -> None:
    """Models are the base model and the engine's LoRA adapters (when it has a manager): a request
    naming an adapter runs with lora_name set; an unknown name is a 404."""
    s, _ = scripted
    s.aeng.script = "ok"
    s.engine.lora_manager = _Adapters(["support-bot"])
    try:
        ids = [m.id for m in s.client.models.list().data]
        assert ids == [s.engine.model_name, "support-bot"]
        assert s.client.models.retrieve("support-bot").model_extra["parent"] == s.engine.model_name
        out = s.client.chat.completions.create(model="support-bot", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=5)
        assert out.model == "support-bot" and s.aeng.last_kwargs.get("lora_name") == "support-bot"
        s.client.chat.completions.create(model=s.engine.model_name, messages=[{"role": "user", "content": "hi"}],
                                         max_tokens=5)
        assert "lora_name" not in s.aeng.last_kwargs
        with pytest.raises(openai.NotFoundError):
            s.client.chat.completions.create(model="other-bot", messages=[{"role": "user", "content": "hi"}])
    finally:
        s.engine.lora_manager = None


def test_call_cut_off_by_a_stop_string_is_not_tool_calls(scripted: tuple[Scripted, Any]) -> None:
    """A stop string inside a call's arguments ends the reply mid-call: the call comes back as far as it
    got (as with max_tokens), and finish_reason stays "stop": "tool_calls" promises complete calls."""
    s, render = scripted
    whole = render([CALL_A])
    s.aeng.script = whole[:whole.index("Paris")]  # what a request with stop="Paris" gets
    out = _ask(s, False, tool_choice="required", stop="Paris")
    calls = out.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "get_weather" and calls[0].function.arguments.endswith('"')
    assert out.choices[0].finish_reason == "stop"
    _, streamed, finish = _reassemble(list(_ask(s, True, tool_choice="required", stop="Paris")))
    assert finish == "stop" and streamed[0]["arguments"] == calls[0].function.arguments
