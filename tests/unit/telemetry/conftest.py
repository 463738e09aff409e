"""Real telemetry servers in-process on port 0, on SQLite (temp dir) and a fresh PostgreSQL db."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

from services.kit.channels import open_channel
from services.kit.server import Cleanup, Running, start
from services.telemetry.app import build
from services.telemetry.settings import TelemetrySettings
from toolmesh.telemetry.v1 import telemetry_pb2_grpc


class TelemetryServer:
    """One telemetry server plus stubs for its two services on the same port."""

    def __init__(self, settings: TelemetrySettings) -> None:
        self.settings = settings
        self.running: Running | None = None

    async def start(self) -> TelemetryServer:
        cleanups: list[Cleanup] = []
        self.running = await start(self.settings, build(self.settings, cleanups))
        self.running.cleanups.extend(cleanups)
        self.address = f"127.0.0.1:{self.running.port}"
        self.channel = open_channel(self.address)
        self.stub = telemetry_pb2_grpc.TelemetryStub(self.channel)
        self.otlp = trace_service_pb2_grpc.TraceServiceStub(self.channel)
        return self

    async def stop(self) -> None:
        if self.running is not None:
            await self.channel.close()
            await self.running.stop(0)
            self.running = None


@pytest.fixture(params=["sqlite", "postgres"])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> TelemetrySettings:
    url = request.getfixturevalue("postgres_url") if request.param == "postgres" else ""
    return TelemetrySettings(port=0, data_dir=tmp_path, database_url=url, replica_id="replica-1")


@pytest.fixture
async def server(settings: TelemetrySettings) -> AsyncIterator[TelemetryServer]:
    running = await TelemetryServer(settings).start()
    yield running
    await running.stop()


@pytest.fixture
async def replica(server: TelemetryServer) -> AsyncIterator[TelemetryServer]:
    """A second server on the same database, started once the first one has migrated it; it
    keeps its own checkpoint log beside the first one's."""
    second = server.settings.model_copy(update={"replica_id": "replica-2"})
    running = await TelemetryServer(second).start()
    yield running
    await running.stop()
