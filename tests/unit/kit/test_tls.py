"""Mutual TLS: certificates from `make certs`, per-RPC peer rules, plaintext refused."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.kit.certs import make_all
from services.kit.channels import open_channel
from services.kit.peers import ANY_PEER, GATEWAY, PeerRules
from services.kit.server import Registered, Running, StartupRefused, check_environment, start
from services.kit.settings import ServiceSettings
from services.kit.tls import TlsFiles
from toolmesh.memory.v1 import memory_pb2

SERVICE = "toolmesh.test.v1.Echo"


class MemoryLikeSettings(ServiceSettings):
    service_name = "memory"


async def _echo(request: bytes, context: aio.ServicerContext) -> bytes:
    return request


RULES = PeerRules.for_service(SERVICE, {"Echo": [GATEWAY], "Open": [ANY_PEER]})


def _add_echo(server: aio.Server) -> None:
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Echo": grpc.unary_unary_rpc_method_handler(_echo),
            "Open": grpc.unary_unary_rpc_method_handler(_echo),
        },
    )
    server.add_generic_rpc_handlers((handler,))


async def _register(server: aio.Server) -> Registered:
    _add_echo(server)
    return Registered([SERVICE], peers=RULES)


async def _register_without_rules(server: aio.Server) -> Sequence[str]:
    _add_echo(server)
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


async def _echo_as(
    server: Running, credentials: grpc.ChannelCredentials | None, method: str = "Echo"
) -> bytes:
    target = f"127.0.0.1:{server.port}"
    channel = (
        open_channel(target, credentials=credentials)
        if credentials
        else aio.insecure_channel(target)
    )
    try:
        return await channel.unary_unary(f"/{SERVICE}/{method}")(b"hi", timeout=3)
    finally:
        await channel.close()


def _tls_settings(certs: Path, **extra: object) -> MemoryLikeSettings:
    return MemoryLikeSettings(
        port=0,
        tls_cert_file=certs / "memory.pem",
        tls_key_file=certs / "memory.key",
        tls_ca_file=certs / "ca.pem",
        **extra,
    )


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


async def test_rules_apply_per_rpc_even_with_an_empty_allowlist(certs: Path) -> None:
    """Any mesh certificate reaches the service, but only the gateway may call Echo."""
    running = await start(_tls_settings(certs), _register)
    try:
        router = _files(certs, "router").channel_credentials()
        assert await _echo_as(running, router, "Open") == b"hi"
        with pytest.raises(aio.AioRpcError) as err:
            await _echo_as(running, router, "Echo")
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "may not call Echo" in (err.value.details() or "")
        assert await _echo_as(running, _files(certs, "gateway").channel_credentials()) == b"hi"
    finally:
        await running.stop(grace=0)


async def test_an_alias_gives_a_certificate_a_role(certs: Path) -> None:
    running = await start(_tls_settings(certs, peer_aliases="router=gateway"), _register)
    try:
        assert await _echo_as(running, _files(certs, "router").channel_credentials()) == b"hi"
    finally:
        await running.stop(grace=0)


async def test_an_inner_service_without_rules_does_not_start(certs: Path) -> None:
    """Deny by default: an inner service that declared no rules would answer any peer."""
    with pytest.raises(StartupRefused, match="which peers may call"):
        await start(_tls_settings(certs), _register_without_rules)


async def test_rules_must_cover_every_rpc(certs: Path) -> None:
    """A served RPC without a rule, or a rule for an RPC not served, refuses start-up."""
    memory = memory_pb2.DESCRIPTOR.services_by_name["Memory"].full_name
    partial = RULES.merged(
        PeerRules.for_service(memory, {"GetHistory": [GATEWAY], "Forget": [GATEWAY]})
    )

    async def register(server: aio.Server) -> Registered:
        _add_echo(server)
        return Registered([SERVICE, memory], peers=partial)

    with pytest.raises(StartupRefused) as refused:
        await start(_tls_settings(certs), register)
    message = str(refused.value)
    assert "missing ['/toolmesh.memory.v1.Memory/AppendTurns'" in message
    assert "unknown ['/toolmesh.memory.v1.Memory/Forget']" in message


def test_production_refuses_plaintext() -> None:
    with pytest.raises(StartupRefused, match="mutual TLS"):
        check_environment(MemoryLikeSettings(env="production"))


def test_production_refuses_an_inner_service_without_client_authentication(certs: Path) -> None:
    settings = _tls_settings(
        certs, env="production", allowed_peers="gateway", tls_require_client_auth=False
    )
    with pytest.raises(StartupRefused, match="TLS_REQUIRE_CLIENT_AUTH"):
        check_environment(settings)


def test_production_refuses_an_empty_allowlist(certs: Path, tmp_path: Path) -> None:
    private = tmp_path / "data"
    private.mkdir(mode=0o700)
    with pytest.raises(StartupRefused, match="TOOLMESH_MEMORY_ALLOWED_PEERS"):
        check_environment(_tls_settings(certs, env="production", data_dir=private))
    check_environment(
        _tls_settings(certs, env="production", allowed_peers="gateway", data_dir=private)
    )


def test_malformed_aliases_are_refused() -> None:
    with pytest.raises(ValueError, match="NAME=ROLE"):
        MemoryLikeSettings(peer_aliases="gateway")


def test_partial_tls_settings_are_refused(certs: Path) -> None:
    with pytest.raises(ValueError, match="tls_cert_file"):
        MemoryLikeSettings(tls_cert_file=certs / "memory.pem")
