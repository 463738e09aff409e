"""One mesh per database backend, shared by the end-to-end tests of that backend."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from testing.mesh import Mesh
from tests.pgutil import fresh_databases
from toolmesh.gateway.v1 import gateway_pb2_grpc

DB_SERVICES = ("auth", "router", "memory", "telemetry")


@pytest.fixture(scope="session", params=["sqlite", "postgres"])
def mesh(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Mesh]:
    data_dir: Path = tmp_path_factory.mktemp(f"mesh-{request.param}")
    # The suite runs the mesh as production would: mutual TLS between every process.
    if request.param == "postgres":
        with fresh_databases(*DB_SERVICES) as urls:
            yield from _running(Mesh(data_dir=data_dir, database_urls=urls, tls=True))
    else:
        yield from _running(Mesh(data_dir=data_dir, tls=True))


def _running(mesh: Mesh) -> Iterator[Mesh]:
    mesh.start_all()
    try:
        yield mesh
    finally:
        mesh.stop_all()


@pytest.fixture(scope="session")
def gateway_channel(mesh: Mesh) -> Iterator[grpc.Channel]:
    with mesh.channel("gateway") as channel:
        yield channel


@pytest.fixture(scope="session")
def gateway(gateway_channel: grpc.Channel) -> gateway_pb2_grpc.GatewayStub:
    return gateway_pb2_grpc.GatewayStub(gateway_channel)


@pytest.fixture(scope="session")
def token(mesh: Mesh) -> str:
    return mesh.token()


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)
