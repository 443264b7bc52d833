"""A constraint is compiled *and used* (first mask, one token, next mask; each string pattern; each
tool alone) in the compile worker, so what a backend builds lazily fails at compile time as that
request's error: a huge counted repetition, a self-referential schema. The error names the field
(HTTP `param`, gRPC message)."""

from __future__ import annotations

from typing import Any, Iterator

import grpc
import httpx
import pytest
from transformers import AutoTokenizer

from agentserve.adapters.openai.app import create_app
from agentserve.adapters.openai.server import ServerThread
from agentserve.config import EngineConfig
from agentserve.engine.async_engine import AsyncEngine
from agentserve.engine.engine import Engine
from agentserve.grammar.interface import GrammarError, allocate_token_bitmask, bitmask_to_ids
from agentserve.grammar.registry import get_backend
from agentserve.grammar.spec import ConstraintSpec, build_tool_constraint
from agentserve.grammar.tokenizer_info import TokenizerInfo
from agentserve.grammar.compiler import GrammarCompiler
from agentserve.service import agent_pb2 as pb
from agentserve.testing.tiny import tiny_model_cached
from conftest_grpc import make_engine, run, serving

HUGE_PATTERN = {"type": "string", "pattern": "^d{1000000}$"}
SELF_REF = {"$ref": "#"}
SELF_REF_ANY = {"anyOf": [{"$ref": "#"}]}
GOOD = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


def _tool(name: str, parameters: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


@pytest.fixture(scope="module")
def compiler() -> Iterator[GrammarCompiler]:
    tok = AutoTokenizer.from_pretrained(str(tiny_model_cached("qwen2")))
    c = GrammarCompiler(get_backend("auto"), TokenizerInfo.from_hf(tok), timeout_s=60)
    yield c
    c.shutdown()


@pytest.mark.parametrize("spec, contains", [
    (ConstraintSpec.regex("a{1000000}"), "regex"),
    (ConstraintSpec.json_schema(HUGE_PATTERN), "cannot use this json_schema"),
    (ConstraintSpec.json_schema({"type": "object", "properties": {"id": HUGE_PATTERN, "n": {"type": "integer"}},
                                 "required": ["n", "id"]}), "pattern"),
    (ConstraintSpec.json_schema(SELF_REF), "allows no output"),
    (ConstraintSpec.json_schema(SELF_REF_ANY), "allows no output"),
])
def test_lazy_failures_fail_the_compile(compiler: GrammarCompiler, spec: ConstraintSpec, contains: str) -> None:
    with pytest.raises(GrammarError) as err:
        compiler.compile(spec)
    assert contains in str(err.value)
    assert "<state>" not in str(err.value)  # no backend state dump


def test_tool_whose_parameters_fail_is_named(compiler: GrammarCompiler) -> None:
    spec = build_tool_constraint([_tool("get_weather", GOOD), _tool("lookup", {
        "type": "object", "properties": {"id": HUGE_PATTERN}, "required": ["id"]})], "required", "hermes")
    assert spec is not None
    with pytest.raises(GrammarError) as err:
        compiler.compile(spec)
    assert 'the parameters of tool "lookup"' in str(err.value)


def test_good_constraints_still_compile(compiler: GrammarCompiler) -> None:
    for spec in (ConstraintSpec.regex("a{1000}"), ConstraintSpec.json_schema(GOOD),
                 ConstraintSpec.json_schema({"type": "string", "pattern": "^[a-z]{2,8}$"}),
                 build_tool_constraint([_tool("get_weather", GOOD)], "auto", "hermes")):
        assert spec is not None
        vocab_size = compiler.tokenizer_info.vocab_size
        bitmask = allocate_token_bitmask(1, vocab_size, pin_memory=False)
        compiler.compile(spec).new_matcher().fill_bitmask(bitmask)
        assert bitmask_to_ids(bitmask[0], vocab_size)  # some token is allowed first


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    config = EngineConfig.from_kwargs(str(tiny_model_cached("qwen2")), device="cpu", num_blocks=256,
                                      served_model_name="m", max_model_len=2048)
    aeng = AsyncEngine(Engine(config))
    server = ServerThread(create_app(aeng, config)).start()
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client
    server.stop()
    aeng.shutdown()


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SELF_REF}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": HUGE_PATTERN}}},
     "response_format.json_schema.schema"),
    ({"guided_regex": "a{1000000}"}, "guided_regex"),
    ({"guided_json": SELF_REF_ANY}, "guided_json"),
    ({"tools": [_tool("get_weather", GOOD), _tool("lookup", {"type": "object", "properties": {"id": HUGE_PATTERN},
                                                             "required": ["id"]})], "tool_choice": "required"},
     "tools[1].function.parameters"),
])
def test_http_constraint_errors_name_the_field(http: httpx.Client, body: dict[str, Any], param: str,
                                               stream: bool) -> None:
    r = http.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                                "max_tokens": 4, "stream": stream, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    assert "could not be compiled" in err["message"]


def test_grpc_generate_with_lazy_failing_regex_is_invalid_argument() -> None:
    aeng = make_engine()

    async def main() -> None:
        async with serving(aeng) as (_handle, client):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in client.stub.Generate(pb.GenerateRequest(
                        prompt="hi", sampling=pb.SamplingParams(max_tokens=4),
                        response_format=pb.ResponseFormat(type="regex", regex="a{1000000}"))):
                    pass
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "regex" in err.value.details() and "could not be compiled" in err.value.details()
            done = await client.generate_done("hi", max_tokens=3, temperature=0)  # the server is fine
            assert done.usage.completion_tokens > 0

    try:
        run(main())
    finally:
        aeng.shutdown()
