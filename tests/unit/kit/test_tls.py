"""Mutual TLS: certificates from `make certs`, a peer allowlist, plaintext refused."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.kit.certs import make_all
from services.kit.channels import open_channel
from services.kit.server import Running, StartupRefused, check_environment, start
from services.kit.settings import ServiceSettings
from services.kit.tls import TlsFiles

SERVICE = "toolmesh.test.v1.Echo"


class MemoryLikeSettings(ServiceSettings):
    service_name = "memory"


async def _echo(request: bytes, context: aio.ServicerContext) -> bytes:
    return request


async def _register(server: aio.Server) -> Sequence[str]:
    handler = grpc.method_handlers_generic_handler(
        SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(_echo)}
    )
    server.add_generic_rpc_handlers((handler,))
    return [SERVICE]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("certs")
    make_all(out)
    return out


def _files(certs: Path, name: str) -> TlsFiles:
    return TlsFiles.load(certs / f"{name}.pem", certs / f"{name}.key", certs / "ca.pem")


@pytest.fixture
async def server(certs: Path) -> AsyncIterator[Running]:
    settings = MemoryLikeSettings(
        port=0,
        tls_cert_file=certs / "memory.pem",
        tls_key_file=certs / "memory.key",
        tls_ca_file=certs / "ca.pem",
        allowed_peers="gateway",
    )
    running = await start(settings, _register)
    try:
        yield running
    finally:
        await running.stop(grace=0)


async def _echo_as(server: Running, credentials: grpc.ChannelCredentials | None) -> bytes:
    target = f"127.0.0.1:{server.port}"
    channel = (
        open_channel(target, credentials=credentials)
        if credentials
        else aio.insecure_channel(target)
    )
    try:
        return await channel.unary_unary(f"/{SERVICE}/Echo")(b"hi", timeout=3)
    finally:
        await channel.close()


def test_key_files_are_private(certs: Path) -> None:
    for key in certs.glob("*.key"):
        assert key.stat().st_mode & 0o077 == 0, key


async def test_allowed_peer_is_served(server: Running, certs: Path) -> None:
    assert await _echo_as(server, _files(certs, "gateway").channel_credentials()) == b"hi"


async def test_other_peer_is_refused(server: Running, certs: Path) -> None:
    with pytest.raises(aio.AioRpcError) as err:
        await _echo_as(server, _files(certs, "router").channel_credentials())
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "router" in (err.value.details() or "")


async def test_plaintext_and_missing_client_certificate_are_refused(
    server: Running, certs: Path
) -> None:
    with pytest.raises(aio.AioRpcError) as err:
        await _echo_as(server, None)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    no_client_cert = grpc.ssl_channel_credentials(root_certificates=(certs / "ca.pem").read_bytes())
    with pytest.raises(aio.AioRpcError) as err:
        await _echo_as(server, no_client_cert)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_health_is_open_to_any_mesh_peer(server: Running, certs: Path) -> None:
    channel = open_channel(
        f"127.0.0.1:{server.port}", credentials=_files(certs, "router").channel_credentials()
    )
    try:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=3
        )
    finally:
        await channel.close()
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_production_refuses_plaintext() -> None:
    with pytest.raises(StartupRefused, match="mutual TLS"):
        check_environment(MemoryLikeSettings(env="production"))


def test_partial_tls_settings_are_refused(certs: Path) -> None:
    with pytest.raises(ValueError, match="tls_cert_file"):
        MemoryLikeSettings(tls_cert_file=certs / "memory.pem")
