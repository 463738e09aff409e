"""A real gateway in-process in front of the contract fakes, and the MCP face as a real process
calling it: one of each for the whole module (the face takes a second or two to start)."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.faceproc import FaceProcess
from tests.unit.gateway.conftest import GatewayUnderTest, start_gateway
from tests.unit.gateway.fake_ledger import LedgerTelemetry
from tests.unit.gateway.fakes import Fakes


@dataclass
class Faced:
    gw: GatewayUnderTest
    ledger: LedgerTelemetry
    face: FaceProcess

    def token(self, **claims: object) -> str:
        return self.gw.token(**claims)


@pytest.fixture(scope="module")
async def faced() -> AsyncIterator[Faced]:
    ledger = LedgerTelemetry()
    inner, gateway, channel, gw = await start_gateway(
        Fakes(telemetry=ledger), prices_refresh_s=0.05, budget_state_ttl_s=0.2
    )
    await gw.wait_ready()
    log_dir = Path(tempfile.mkdtemp(prefix="toolmesh-mcpface-"))
    face = FaceProcess(f"127.0.0.1:{gateway.port}", log_dir / "mcpface.log")
    await asyncio.to_thread(face.start)
    yield Faced(gw, ledger, face)
    face.stop()
    await channel.close()
    await gateway.stop(0)
    await inner.stop(0)
