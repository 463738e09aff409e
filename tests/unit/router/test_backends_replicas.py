"""Two router replicas (real processes) on one PostgreSQL database share their backends; the
example gRPC tool service (its own process) behind them. A backend registered through one
replica is served by the other within backend_sync_s, each replica starts its own stdio
server, and a removal stops both."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc import aio

from services.kit.channels import open_channel
from tests.unit.router.backend_helpers import (
    ADMIN,
    REPO,
    SCRIPTS,
    children,
    eventually,
    free_port,
    invoke,
    process,
    register,
    stdio_backend,
)
from toolmesh.router.v1 import router_pb2, router_pb2_grpc

pytestmark = pytest.mark.postgres


@dataclass
class Replicas:
    a: router_pb2_grpc.RouterStub
    b: router_pb2_grpc.RouterStub
    ledger_port: int
    root: Path


@pytest.fixture(scope="module")
def database(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from tests.pgutil import fresh_databases

    with fresh_databases("replicas") as urls:
        yield urls["replicas"]


@pytest.fixture(scope="module")
async def replicas(
    database: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Replicas]:
    root = tmp_path_factory.mktemp("replicas")
    ledger_port = free_port()
    ports = [free_port(), free_port()]
    env = {
        "TOOLMESH_ROUTER_DATABASE_URL": database,
        "TOOLMESH_ROUTER_BACKEND_SYNC_S": "0.5",
        "TOOLMESH_ROUTER_TELEMETRY_TARGET": "127.0.0.1:9",
        "TOOLMESH_OTLP_ENDPOINT": "",
        "TOOLMESH_METRICS_PORT": "0",
        "PYTHONPATH": str(REPO),
    }
    ledger = [sys.executable, "-m", "examples.grpc_tool_service", "--port", str(ledger_port)]
    routers = [
        [sys.executable, "-m", "services.router"],
        [sys.executable, "-m", "services.router"],
    ]
    with (
        process(ledger, port=ledger_port, env={"PYTHONPATH": str(REPO)}),
        process(
            routers[0],
            port=ports[0],
            env={
                **env,
                "TOOLMESH_ROUTER_PORT": str(ports[0]),
                "TOOLMESH_DATA_DIR": str(root / "a"),
            },
        ),
        process(
            routers[1],
            port=ports[1],
            env={
                **env,
                "TOOLMESH_ROUTER_PORT": str(ports[1]),
                "TOOLMESH_DATA_DIR": str(root / "b"),
            },
        ),
    ):
        channels = [open_channel(f"127.0.0.1:{port}") for port in ports]
        try:
            yield Replicas(
                router_pb2_grpc.RouterStub(channels[0]),
                router_pb2_grpc.RouterStub(channels[1]),
                ledger_port,
                root,
            )
        finally:
            for channel in channels:
                await channel.close()


async def _backend(stub: router_pb2_grpc.RouterStub, name: str) -> router_pb2.Backend | None:
    reply = await stub.ListBackends(router_pb2.ListBackendsRequest(caller=ADMIN), timeout=5)
    return next((b for b in reply.backends if b.name == name), None)


async def test_a_grpc_tool_service_registered_on_one_replica_is_served_by_both(
    replicas: Replicas,
) -> None:
    ledger = await register(
        replicas.a,
        router_pb2.Backend(
            name="ledger",
            kind=router_pb2.BACKEND_KIND_GRPC,
            target=f"127.0.0.1:{replicas.ledger_port}",
            cost_units=5,
        ),
    )
    assert ledger.state == router_pb2.BACKEND_STATE_READY, ledger.last_error
    sides = {t.name: t.side_effect for t in ledger.tools}
    assert sides == {
        "ledger.balance": router_pb2.SIDE_EFFECT_READ_ONLY,
        "ledger.deposit": router_pb2.SIDE_EFFECT_WRITE,
    }

    async def ready_on_b() -> bool:
        seen = await _backend(replicas.b, "ledger")
        return seen is not None and seen.state == router_pb2.BACKEND_STATE_READY

    await eventually(ready_on_b, timeout_s=10)
    deposit = {"account": "ops", "cents": 250}
    first = await invoke(replicas.b, "ledger.deposit", deposit, idempotency_key="dep-1")
    assert first.answer == "Deposited 250 cents to ops." and first.cost_units == 5
    again = await invoke(replicas.a, "ledger.deposit", deposit, idempotency_key="dep-1")
    assert again.answer == first.answer
    balance = await invoke(replicas.a, "ledger.balance", {"account": "ops"})
    assert json.loads(balance.result_json) == {"account": "ops", "cents": 250}
    frozen = await invoke(
        replicas.b, "ledger.deposit", {"account": "frozen", "cents": 1}, idempotency_key="dep-2"
    )
    assert frozen.tool_error and frozen.answer == "That account is frozen."

    await replicas.b.RemoveBackend(
        router_pb2.RemoveBackendRequest(caller=ADMIN, name="ledger"), timeout=5
    )

    async def gone_on_a() -> bool:
        try:
            await invoke(replicas.a, "ledger.balance", {"account": "ops"})
        except aio.AioRpcError as error:
            return error.code() == grpc.StatusCode.NOT_FOUND
        return False

    await eventually(gone_on_a, timeout_s=10)


async def test_each_replica_runs_its_own_stdio_server_and_removal_stops_both(
    replicas: Replicas,
) -> None:
    state = replicas.root / "echo.json"
    state.write_text("{}")
    command = [sys.executable, str(SCRIPTS / "scripted.py"), str(state)]
    await register(replicas.a, stdio_backend("words", command))
    await eventually(lambda: len(children(str(state))) == 2, timeout_s=15)

    async def ready_on_b() -> bool:
        seen = await _backend(replicas.b, "words")
        return seen is not None and seen.state == router_pb2.BACKEND_STATE_READY

    await eventually(ready_on_b, timeout_s=10)
    assert (await invoke(replicas.b, "words.lookup", {"word": "x"})).answer == "x: a word"
    await replicas.a.RemoveBackend(
        router_pb2.RemoveBackendRequest(caller=ADMIN, name="words"), timeout=5
    )
    await eventually(lambda: not children(str(state)), timeout_s=10)


def test_the_example_service_imports_no_toolmesh_service_code() -> None:
    source = (REPO / "examples" / "grpc_tool_service" / "__main__.py").read_text()
    imports = [
        line.split()[1] for line in source.splitlines() if line.startswith(("import ", "from "))
    ]
    assert not [m for m in imports if m.startswith(("services", "gateway", "cli"))], imports
    check = subprocess.run(
        [
            sys.executable,
            "-c",
            "import examples.grpc_tool_service.__main__, sys; "
            "print(sorted(m for m in sys.modules if m.startswith(('services', 'gateway'))))",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=True,
    )
    assert check.stdout.strip() == "[]"
