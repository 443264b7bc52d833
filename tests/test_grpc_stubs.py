"""The committed gRPC stubs match proto/agentserve/v1/agent.proto and import on grpcio 1.84."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest

from agentserve.adapters.client.client import to_tool
from agentserve.service import _stub_info, agent_pb2, agent_pb2_grpc, gen_stubs


def test_stubs_were_generated_from_this_proto() -> None:
    # Fails as soon as the .proto changes without regenerating (python -m agentserve.service.gen_stubs).
    assert _stub_info.PROTO_SHA256 == gen_stubs.proto_sha256(), (
        "agent.proto changed since the stubs were generated: run python -m agentserve.service.gen_stubs")


def test_stubs_import_on_the_oldest_supported_grpcio() -> None:
    assert _stub_info.GRPCIO_TOOLS_VERSION == gen_stubs.GRPCIO_TOOLS_VERSION
    major, minor, *_ = (int(x) for x in agent_pb2_grpc.GRPC_GENERATED_VERSION.split("."))
    assert (major, minor) <= (1, 84), "stubs from a grpcio-tools newer than 1.84 refuse to import on the GPU machine"
    assert "from agentserve.service import agent_pb2" in Path(agent_pb2_grpc.__file__).read_text()
    # the contract names of DESIGN.md
    methods = set(agent_pb2.DESCRIPTOR.services_by_name["AgentService"].methods_by_name)
    assert methods == {"CreateSession", "Turn", "ForkSession", "GetSession", "ListSessions", "CloseSession",
                       "Generate", "ListModels", "LoadAdapter", "UnloadAdapter", "Health"}
    assert agent_pb2.DESCRIPTOR.package == "agentserve.v1"


def test_regenerating_gives_the_committed_stubs() -> None:
    tools = gen_stubs.find_grpc_tools()
    if tools is None:
        pytest.skip(f"grpcio-tools {gen_stubs.GRPCIO_TOOLS_VERSION} is not installed beside the project "
                    f"(python3 -m pip install --no-deps --target .grpc-tools grpcio-tools=="
                    f"{gen_stubs.GRPCIO_TOOLS_VERSION}); the proto hash check above still guards staleness")
    with tempfile.TemporaryDirectory() as tmp:
        files = gen_stubs.generate(Path(tmp), tools)
    for name, text in files.items():
        assert (gen_stubs.PACKAGE_DIR / name).read_text() == text, f"{name} differs from a fresh generation"


def test_client_tools_in_the_openai_or_the_proto_shape() -> None:
    schema = {"type": "object", "properties": {"q": {"type": "string"}}}
    shapes = [{"type": "function", "function": {"name": "f", "parameters": schema}},
              {"name": "f", "parameters": schema}, {"name": "f", "parameters_json": json.dumps(schema)}]
    assert all(json.loads(to_tool(t).parameters_json) == schema and to_tool(t).name == "f" for t in shapes)
    assert to_tool({"name": "g"}).parameters_json == ""  # no arguments
