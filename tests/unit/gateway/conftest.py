"""A real gateway server in-process, in front of contract fakes of the four inner services."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
import pytest
from grpc import aio

from gateway.app import build
from gateway.settings import GatewaySettings
from services.kit.server import Cleanup, Running, start
from services.kit.settings import ServiceSettings
from tests.unit.gateway.fakes import Fakes, mint
from toolmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@dataclass
class GatewayUnderTest:
    fakes: Fakes
    stub: gateway_pb2_grpc.GatewayStub
    settings: GatewaySettings

    def token(self, **overrides: object) -> str:
        return mint(self.fakes.auth.keys[-1], **overrides)

    async def wait_ready(self, timeout: float = 5.0) -> None:
        """Until the gateway has loaded auth's state once."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                await self.stub.GetServiceInfo(
                    gateway_pb2.GetServiceInfoRequest(), metadata=bearer(self.token()), timeout=1
                )
                return
            except aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE or loop.time() > deadline:
                    raise
            await asyncio.sleep(0.05)


async def eventually(check: Callable[[], bool], within_s: float = 5.0) -> None:
    """Poll ``check`` until it holds; fail after ``within_s`` (a bound for slow machines, not a
    timing assertion)."""
    deadline = time.monotonic() + within_s
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def ready_once_auth_is_back(gw: GatewayUnderTest, clock: ManualClock) -> None:
    """Auth is up again: move ``clock`` past the auth breaker's open period until a trial
    refresh has succeeded. More than once, because a refresh that failed before auth came back
    may report its failure late (on a loaded machine) and open the breaker again."""
    for _ in range(20):
        clock.advance(60)
        try:
            await gw.wait_ready(timeout=0.5)
            return
        except aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.UNAVAILABLE
    raise AssertionError("the gateway never refreshed auth's state again")


class ManualClock:
    """A monotonic clock that moves only when a test moves it (``gateway.app.build(clock=)``)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def start_gateway(
    fakes: Fakes, *, clock: Callable[[], float] = time.monotonic, **overrides: object
) -> tuple[Running, Running, aio.Channel, GatewayUnderTest]:
    inner = await start(ServiceSettings(port=0), fakes.register)
    gateway, channel, under_test = await start_gateway_on(
        inner.port, fakes, clock=clock, **overrides
    )
    return inner, gateway, channel, under_test


async def start_gateway_on(
    inner_port: int,
    fakes: Fakes,
    *,
    clock: Callable[[], float] = time.monotonic,
    **overrides: object,
) -> tuple[Running, aio.Channel, GatewayUnderTest]:
    """A gateway in front of fakes already serving on ``inner_port``; ``clock`` drives its
    breakers, auth staleness, budget state TTL and audit rate limit."""
    target = f"127.0.0.1:{inner_port}"
    values: dict[str, object] = {
        "port": 0,
        "auth_target": target,
        "router_target": target,
        "memory_target": target,
        "telemetry_target": target,
        "auth_refresh_s": 0.1,
        "otlp_endpoint": "",
        "outbox_idle_s": 0.05,
        "outbox_backoff_base_s": 0.02,
        "outbox_backoff_max_s": 0.1,
        **overrides,
    }
    own_dir = "data_dir" not in values
    if own_dir:
        # Each gateway gets its own outbox file unless a test passes a data_dir to share.
        values["data_dir"] = tempfile.mkdtemp(prefix="toolmesh-gw-")
    settings = GatewaySettings(**values)  # type: ignore[arg-type]
    cleanups: list[Cleanup] = []
    if own_dir:

        async def remove_dir() -> None:  # runs last: clean-ups run in reverse
            shutil.rmtree(settings.data_dir, ignore_errors=True)

        cleanups.append(remove_dir)
    gateway = await start(settings, build(settings, cleanups, clock=clock))
    gateway.cleanups.extend(cleanups)
    channel = aio.insecure_channel(f"127.0.0.1:{gateway.port}")
    return (
        gateway,
        channel,
        GatewayUnderTest(fakes, gateway_pb2_grpc.GatewayStub(channel), settings),
    )


@pytest.fixture
async def gw() -> AsyncIterator[GatewayUnderTest]:
    inner, gateway, channel, under_test = await start_gateway(Fakes())
    await under_test.wait_ready()
    yield under_test
    await channel.close()
    await gateway.stop(0)
    await inner.stop(0)
