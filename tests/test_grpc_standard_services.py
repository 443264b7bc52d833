"""The standard gRPC services beside AgentService, and model ids:

- a client that knows nothing but server reflection lists the services and calls AgentService.Health
  and ListModels through message classes built from the reflected descriptors (what grpcurl does);
- grpc.health.v1 Check is SERVING while the server runs and NOT_SERVING from the shutdown on (Watch
  streams are told), and needs no API key (Kubernetes probes send none) while everything else does;
- the served model name is the model directory's base name (or --served-model-name's names), and
  the path keeps working as an alias over gRPC and HTTP.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from agentserve.config import ModelConfig
from agentserve.service import agent_pb2, agent_pb2_grpc
from agentserve.service.serve import running_server
from agentserve.service.standard_services import mark_draining
from conftest_grpc import make_engine, model_path, run, serving

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
AGENT_SERVICE = "agentserve.v1.AgentService"


@pytest.fixture(scope="module")
def aeng():  # type: ignore[no-untyped-def]
    engine = make_engine(max_model_len=256, num_blocks=64)
    yield engine
    engine.shutdown()


# --- reflection ---------------------------------------------------------------------------------------


def reflect_and_call(address: str) -> tuple[list[str], dict[str, Any], dict[str, Any], bool]:
    """A blocking client with no compiled stubs: everything it knows comes from server reflection."""
    with grpc.insecure_channel(address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = sorted(database.get_services())
        pool = descriptor_pool.DescriptorPool(database)  # not the default pool agent_pb2 lives in
        service = pool.FindServiceByName(AGENT_SERVICE)

        def call(method_name: str) -> tuple[dict[str, Any], type]:
            method = service.FindMethodByName(method_name)
            request_cls = message_factory.GetMessageClass(method.input_type)
            response_cls = message_factory.GetMessageClass(method.output_type)
            rpc = channel.unary_unary(f"/{service.full_name}/{method.name}",
                                      request_serializer=request_cls.SerializeToString,
                                      response_deserializer=response_cls.FromString)
            return json_format.MessageToDict(rpc(request_cls(), timeout=30)), response_cls

        health, health_cls = call("Health")
        models, _ = call("ListModels")
        return services, health, models, health_cls is agent_pb2.HealthResponse


def test_a_reflection_only_client_lists_and_calls_the_service(aeng) -> None:  # type: ignore[no-untyped-def]
    async def body() -> tuple[list[str], dict[str, Any], dict[str, Any], bool]:
        async with serving(aeng) as (handle, _):
            # blocking client: off the event loop the server runs on
            return await asyncio.to_thread(reflect_and_call, handle.address)

    services, health, models, compiled = run(body())
    assert services == sorted([AGENT_SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"])
    assert not compiled, "the message classes must come from the reflected descriptors"
    name = Path(model_path()).name
    assert health["status"] == "SERVING" and health["model"] == name
    assert [m["id"] for m in models["models"]] == [name] and models["models"][0]["hasChatTemplate"]


# --- grpc.health.v1 -----------------------------------------------------------------------------------


def test_health_check_serving_then_not_serving_while_draining(aeng) -> None:  # type: ignore[no-untyped-def]
    async def body() -> list[Any]:
        seen: list[Any] = []
        async with serving(aeng, grace=0.5) as (handle, _):
            async with grpc.aio.insecure_channel(handle.address) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                for service in ("", AGENT_SERVICE):
                    seen.append((await stub.Check(health_pb2.HealthCheckRequest(service=service))).status)
                with pytest.raises(grpc.aio.AioRpcError) as unknown:
                    await stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
                seen.append(unknown.value.code())
                # The drain phase of a shutdown: the server still answers, and says it is not serving.
                assert handle.health is not None
                await mark_draining(handle.health)
                for service in ("", AGENT_SERVICE):
                    seen.append((await stub.Check(health_pb2.HealthCheckRequest(service=service))).status)
        return seen

    assert run(body()) == [SERVING, SERVING, grpc.StatusCode.NOT_FOUND, NOT_SERVING, NOT_SERVING]


def test_a_health_watch_sees_not_serving_when_the_server_shuts_down(aeng) -> None:  # type: ignore[no-untyped-def]
    async def body() -> list[Any]:
        statuses: list[Any] = []
        channel = None
        try:
            async with serving(aeng, grace=0.5) as (handle, _):
                channel = grpc.aio.insecure_channel(handle.address)
                watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
                statuses.append((await watch.read()).status)
            # running_server's exit: NOT_SERVING goes out before the server stops
            statuses.append((await watch.read()).status)
        finally:
            if channel is not None:
                await channel.close()
        return statuses

    assert run(body()) == [SERVING, NOT_SERVING]


def test_health_checks_need_no_api_key_everything_else_does(aeng) -> None:  # type: ignore[no-untyped-def]
    async def body() -> list[Any]:
        seen: list[Any] = []
        async with serving(aeng, api_key="sekret") as (handle, client):
            async with grpc.aio.insecure_channel(handle.address) as channel:
                check = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
                seen.append(check.status)
                for call in (agent_pb2_health(channel), reflection_request(channel, ())):
                    with pytest.raises(grpc.aio.AioRpcError) as denied:
                        await call
                    seen.append(denied.value.code())
                keyed = await reflection_request(channel, (("authorization", "Bearer sekret"),))
                seen.append(sorted(s.name for s in keyed.list_services_response.service))
            seen.append((await client.health()).status == agent_pb2.HealthResponse.SERVING)
        return seen

    assert run(body()) == [
        SERVING, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAUTHENTICATED,
        sorted([AGENT_SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"]), True]


def agent_pb2_health(channel: grpc.aio.Channel) -> Any:
    return agent_pb2_grpc.AgentServiceStub(channel).Health(agent_pb2.HealthRequest())


async def reflection_request(channel: grpc.aio.Channel, metadata: Any) -> Any:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                     metadata=metadata)
    async for response in call:
        return response
    raise AssertionError("no reflection response")


# --- model ids ----------------------------------------------------------------------------------------


def test_served_names_default_to_the_directory_base_name() -> None:
    assert ModelConfig(model="/models/Qwen2.5-7B-Instruct/").served_model_names() == ["Qwen2.5-7B-Instruct"]
    assert ModelConfig(model="llama-3.1-8b", load_format="dummy").served_model_names() == ["llama-3.1-8b"]
    named = ModelConfig(model="/m/x", served_model_name=["agent", "agent-v2"])
    assert named.served_model_names() == ["agent", "agent-v2"]
    assert named.accepted_model_names() == {"agent", "agent-v2", "/m/x"}
    assert ModelConfig(model="/m/x", served_model_name="one").accepted_model_names() == {"one", "/m/x"}


def test_default_name_and_path_alias_over_grpc_and_http(aeng) -> None:  # type: ignore[no-untyped-def]
    path = model_path()
    name = Path(path).name

    async def body() -> list[Any]:
        seen: list[Any] = []
        async with serving(aeng, http_port=0) as (handle, client):
            seen.append([m.id for m in await client.list_models()])
            for model in (name, path):
                done = await client.generate_done("Hello", model=model, max_tokens=2)
                seen.append(done.usage.completion_tokens)
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await client.generate_done("Hello", model="other-model", max_tokens=2)
            seen.append(unknown.value.code())
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{handle.http_port}", timeout=60) as http:
                seen.append([m["id"] for m in (await http.get("/v1/models")).json()["data"]])
                for model in (name, path):
                    r = await http.post("/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 2})
                    seen.append(r.status_code)
        return seen

    assert run(body()) == [[name], 2, 2, grpc.StatusCode.NOT_FOUND, [name], 200, 200]


def test_several_served_model_names() -> None:
    aeng = make_engine(max_model_len=256, num_blocks=32, served_model_name=["agent", "agent-v2"])

    async def body() -> list[Any]:
        async with running_server(aeng.engine.config, async_engine=aeng, http_port=0) as handle:
            async with grpc.aio.insecure_channel(handle.address) as channel:
                stub = agent_pb2_grpc.AgentServiceStub(channel)
                grpc_ids = [m.id for m in (await stub.ListModels(agent_pb2.ListModelsRequest())).models]
                session = await stub.CreateSession(agent_pb2.CreateSessionRequest(model="agent-v2"))
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{handle.http_port}", timeout=60) as http:
                http_ids = [m["id"] for m in (await http.get("/v1/models")).json()["data"]]
                status = (await http.post("/v1/completions", json={
                    "model": "agent-v2", "prompt": "Hi", "max_tokens": 1})).status_code
            return [grpc_ids, session.model, http_ids, status]

    try:
        # A session opened under any accepted name reports the main one.
        assert run(body()) == [["agent", "agent-v2"], "agent", ["agent", "agent-v2"], 200]
    finally:
        aeng.shutdown()
