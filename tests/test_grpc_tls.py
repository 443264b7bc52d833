"""The gRPC port over TLS with the server's certificate (--ssl-keyfile / --ssl-certfile, as HTTPS): a real grpcio
client with the certificate as its root generates; a plain-text client cannot talk to it. With --ssl-ca-certs and
--ssl-cert-reqs 2 the client must also present a certificate signed by that CA (mutual TLS)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from agentserve.adapters.client.client import AgentClient
from agentserve.config import EngineConfig
from agentserve.service.serve import running_server
from agentserve.testing import tiny_model_cached
from helpers.tls import self_signed


def _config(**tls: object) -> EngineConfig:
    return EngineConfig.from_kwargs(str(tiny_model_cached("qwen2")), device="cpu", num_blocks=64, max_model_len=256,
                                    served_model_name="m", api_key="k", **tls)


def test_grpc_over_tls_with_the_servers_certificate(tmp_path: Path) -> None:
    key_file, cert_file = self_signed(tmp_path)
    trust = grpc.ssl_channel_credentials(root_certificates=Path(cert_file).read_bytes())

    async def main() -> None:
        async with running_server(_config(ssl_keyfile=key_file, ssl_certfile=cert_file), grpc_port=0,
                                  http_port=None) as handle:
            async with AgentClient(handle.address, api_key="k", credentials=trust) as client:
                assert [m.id for m in await client.list_models()] == ["m"]
                done = await client.generate_done("hi", max_tokens=2, temperature=0)
                assert len(done.token_ids) == 2
            async with AgentClient(handle.address, api_key="k") as plain:  # plain text: no handshake, no answer
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    await asyncio.wait_for(plain.list_models(), 30)
                assert error.value.code() == grpc.StatusCode.UNAVAILABLE

    asyncio.run(main())


def test_client_certificates_are_required_with_cert_reqs_2(tmp_path: Path) -> None:
    (tmp_path / "server").mkdir()
    (tmp_path / "client").mkdir()
    key_file, cert_file = self_signed(tmp_path / "server")
    client_key, client_cert = self_signed(tmp_path / "client")  # self-signed: it is its own CA
    roots = Path(cert_file).read_bytes()
    with_cert = grpc.ssl_channel_credentials(root_certificates=roots, private_key=Path(client_key).read_bytes(),
                                             certificate_chain=Path(client_cert).read_bytes())
    without_cert = grpc.ssl_channel_credentials(root_certificates=roots)
    config = _config(ssl_keyfile=key_file, ssl_certfile=cert_file, ssl_ca_certs=client_cert, ssl_cert_reqs=2)

    async def main() -> None:
        async with running_server(config, grpc_port=0, http_port=None) as handle:
            async with AgentClient(handle.address, api_key="k", credentials=with_cert) as client:
                assert [m.id for m in await client.list_models()] == ["m"]
            async with AgentClient(handle.address, api_key="k", credentials=without_cert) as anonymous:
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    await asyncio.wait_for(anonymous.list_models(), 30)
                assert error.value.code() == grpc.StatusCode.UNAVAILABLE

    asyncio.run(main())
