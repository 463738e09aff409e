"""Real memory servers in-process on port 0, on SQLite (temp dir) and on a fresh PostgreSQL db."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from services.kit.channels import open_channel
from services.kit.server import Cleanup, Running, start
from services.memory.app import build
from services.memory.settings import MemorySettings
from toolmesh.memory.v1 import memory_pb2_grpc


class FakeClock:
    """Wall-clock nanoseconds that move only when told, plus 1 µs per reading, so that
    "now" still orders what arrives one after another."""

    def __init__(self, start_ns: int) -> None:
        self.base_ns = start_ns
        self._ticks = itertools.count()

    def __call__(self) -> int:
        return self.base_ns + next(self._ticks) * 1000

    def advance(self, seconds: float) -> None:
        self.base_ns += int(seconds * 1e9)


class MemoryServer:
    """One memory replica plus a client stub; can be stopped and started again."""

    def __init__(self, settings: MemorySettings, clock: Callable[[], int] = time.time_ns) -> None:
        self.settings = settings
        self.clock = clock
        self.running: Running | None = None

    async def start(self) -> MemoryServer:
        cleanups: list[Cleanup] = []
        self.running = await start(self.settings, build(self.settings, cleanups, clock=self.clock))
        self.running.cleanups.extend(cleanups)
        self.channel = open_channel(f"127.0.0.1:{self.running.port}")
        self.stub = memory_pb2_grpc.MemoryStub(self.channel)
        return self

    async def stop(self) -> None:
        if self.running is not None:
            await self.channel.close()
            await self.running.stop(0)
            self.running = None


@pytest.fixture(params=["sqlite", "postgres"])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> MemorySettings:
    url = request.getfixturevalue("postgres_url") if request.param == "postgres" else ""
    return MemorySettings(port=0, data_dir=tmp_path, database_url=url, otlp_endpoint="")


@pytest.fixture
def clock() -> FakeClock:
    """The clock of every replica a test starts with ``replicas``."""
    return FakeClock(time.time_ns())


@pytest.fixture
async def replicas(settings: MemorySettings, clock: FakeClock) -> AsyncIterator[list[MemoryServer]]:
    """Two replicas on the same database, as in production behind one Service.

    On PostgreSQL they start together, so both migrate the fresh database at the same moment.
    On SQLite the first must finish first: the kit's connect hook switches a fresh file to WAL,
    which fails at once (no busy wait) while another connection holds a lock.
    """
    if settings.database_url:
        servers = list(
            await asyncio.gather(
                MemoryServer(settings, clock).start(), MemoryServer(settings, clock).start()
            )
        )
    else:
        servers = [
            await MemoryServer(settings, clock).start(),
            await MemoryServer(settings, clock).start(),
        ]
    yield servers
    for server in servers:
        await server.stop()


@pytest.fixture
def memory(replicas: list[MemoryServer]) -> memory_pb2_grpc.MemoryStub:
    return replicas[0].stub


@pytest.fixture(scope="module")
async def validating(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[memory_pb2_grpc.MemoryStub]:
    """One server for the validation cases: bad input never reaches the database, so the
    backend does not matter and one SQLite server serves them all."""
    settings = MemorySettings(
        port=0, data_dir=tmp_path_factory.mktemp("validating"), database_url="", otlp_endpoint=""
    )
    server = await MemoryServer(settings).start()
    yield server.stub
    await server.stop()
