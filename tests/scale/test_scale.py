"""The multi-replica proof (issue 6): two replicas of every service on one PostgreSQL database.

Clients spread over both gateways with sessions shared between them; one replica of each
service is killed with SIGKILL mid-load. Afterwards no acknowledged turn is lost or stored
twice and every session's turns are in the order their requests were acknowledged. Then a
budget of 10 tool calls holds across both gateways (50 concurrent Runs: exactly 10 answered,
40 RESOURCE_EXHAUSTED) and the audit chain verifies.
`make scale-test` runs it at full length and writes docs/scaling.md; `make test` runs it short.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc import aio

from testing.mesh import SERVICES, Mesh
from tests.e2e.test_security import create_client, issue
from tests.pgutil import fresh_databases
from toolmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from toolmesh.telemetry.v1 import telemetry_pb2

pytestmark = pytest.mark.scale

FULL = os.environ.get("TOOLMESH_SCALE_FULL") == "1"
DURATION_S = 12.0 if FULL else 5.0
KILL_AT_S = 2.0
WORKERS = 12 if FULL else 6
BUDGET_RUNS = 50
BUDGET_LIMIT = 10
RESULTS = Path(os.environ.get("TOOLMESH_SCALE_RESULTS", "var/scale/results.json"))
REPLICAS = {"gateway": 2, "auth": 2, "router": 2, "memory": 2, "telemetry": 2}


@dataclass
class Worker:
    session: str
    acknowledged: list[str] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    with fresh_databases("scale") as urls:
        url = urls["scale"]
        mesh = Mesh(
            data_dir=tmp_path / "var",
            database_urls=dict.fromkeys(("auth", "router", "memory", "telemetry"), url),
            tls=True,
            replicas=REPLICAS,
        )
        mesh.start_all()
        try:
            yield mesh
        finally:
            mesh.stop_all()


async def _load(mesh: Mesh, token: str) -> list[Worker]:
    target = "ipv4:" + mesh.service_target("gateway")
    options = [("grpc.service_config", json.dumps({"loadBalancingConfig": [{"round_robin": {}}]}))]
    metadata = (("authorization", f"Bearer {token}"),)
    workers = [Worker(session=f"shared-{i}") for i in range(WORKERS)]
    stop_at = time.monotonic() + DURATION_S
    options.append(("grpc.ssl_target_name_override", "127.0.0.1"))
    async with aio.secure_channel(target, mesh.credentials(), options=options) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)

        async def run(worker: Worker) -> None:
            n = 0
            while time.monotonic() < stop_at:
                n += 1
                started = time.perf_counter()
                try:
                    reply = await stub.Run(
                        gateway_pb2.RunRequest(
                            session_id=worker.session, prompt=f"what is {n} * 3"
                        ),
                        metadata=metadata,
                        timeout=3,
                    )
                except grpc.aio.AioRpcError as err:
                    code = err.code().name
                    worker.errors[code] = worker.errors.get(code, 0) + 1
                    await asyncio.sleep(0.05)
                    continue
                worker.latencies.append(time.perf_counter() - started)
                worker.acknowledged.append(reply.request_id)

        async def kill_one_of_each() -> None:
            await asyncio.sleep(KILL_AT_S)
            for name in SERVICES:
                await asyncio.to_thread(mesh.stop, f"{name}-1", signal.SIGKILL)

        await asyncio.gather(kill_one_of_each(), *(run(w) for w in workers))
    return workers


def _both_gateways(mesh: Mesh) -> aio.Channel:
    target = "ipv4:" + mesh.service_target("gateway")
    options = [
        ("grpc.service_config", json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})),
        ("grpc.ssl_target_name_override", "127.0.0.1"),
    ]
    return aio.secure_channel(target, mesh.credentials(), options=options)


def _telemetry_settled(mesh: Mesh, token: str, timeout: float = 30.0) -> None:
    """Each gateway answers ListBudgets a few times in a row: its telemetry breaker (tripped
    when a telemetry replica was killed) is closed again, not half-open with few trials."""
    for instance in mesh.instances("gateway"):
        deadline = time.monotonic() + timeout
        good = 0
        with mesh.channel(instance) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            while good < 5:
                try:
                    stub.ListBudgets(
                        gateway_pb2.ListBudgetsRequest(),
                        metadata=(("authorization", f"Bearer {token}"),),
                        timeout=5,
                    )
                    good += 1
                except grpc.RpcError:
                    good = 0
                    assert time.monotonic() < deadline, f"{instance} never reached telemetry"
                    time.sleep(0.5)


async def _budget_burst(mesh: Mesh, token: str) -> dict[str, int]:
    """50 concurrent Runs, spread over both gateways, against 10 tool calls."""
    metadata = (("authorization", f"Bearer {token}"),)
    async with _both_gateways(mesh) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)

        async def one(n: int) -> str:
            try:
                await stub.Run(
                    gateway_pb2.RunRequest(session_id=f"budget-{n}", prompt=f"what is {n} + 4"),
                    metadata=metadata,
                    timeout=30,
                )
            except grpc.aio.AioRpcError as err:
                return str(err.code().name)
            return "OK"

        codes = await asyncio.gather(*(one(n) for n in range(BUDGET_RUNS)))
    counted: dict[str, int] = {}
    for code in codes:
        counted[code] = counted.get(code, 0) + 1
    return counted


def _budget_check(mesh: Mesh, token: str) -> dict[str, int]:
    """Status codes of the 50 Runs of a fresh client with a budget of 10 tool calls a day."""
    client_id, secret = create_client(mesh, "dev", scopes="tools:read")
    runner = issue(mesh, client_id, secret)
    with mesh.channel("gateway") as channel:
        gateway_pb2_grpc.GatewayStub(channel).SetBudget(
            gateway_pb2.SetBudgetRequest(
                principal=client_id,
                period=telemetry_pb2.BUDGET_PERIOD_DAY,
                limits=telemetry_pb2.BudgetAmounts(tool_calls=BUDGET_LIMIT),
            ),
            metadata=(("authorization", f"Bearer {token}"),),
            timeout=10,
        )
    return asyncio.run(_budget_burst(mesh, runner))


def _audit_chain(mesh: Mesh, token: str) -> str:
    with mesh.channel("gateway") as channel:
        verdict = gateway_pb2_grpc.GatewayStub(channel).VerifyAudit(
            gateway_pb2.VerifyAuditRequest(),
            metadata=(("authorization", f"Bearer {token}"),),
            timeout=30,
        )
    if verdict.ok:
        return f"ok ({verdict.events_checked} events)"
    return f"BROKEN: {verdict.problem.message}"


def _history(mesh: Mesh, token: str, session: str) -> list[str]:
    with mesh.channel("gateway") as channel:
        reply = gateway_pb2_grpc.GatewayStub(channel).GetHistory(
            gateway_pb2.GetHistoryRequest(session_id=session, limit=1000),
            metadata=(("authorization", f"Bearer {token}"),),
            timeout=10,
        )
    seqs = [turn.seq for turn in reply.turns]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), f"seq out of order in {session}"
    return [turn.request_id for turn in reply.turns]


def test_two_replicas_of_everything_survive_losing_one(mesh: Mesh) -> None:
    token = mesh.token()
    started = time.monotonic()
    workers = asyncio.run(_load(mesh, token))
    elapsed = time.monotonic() - started
    # A killed gateway replica's outbox is replayed when it comes back, as a restarted pod
    # with its volume would; nothing else is restarted.
    mesh.start("gateway-1")
    lost: list[str] = []
    doubled: list[str] = []
    disordered: list[str] = []
    deadline = time.monotonic() + 30
    for worker in workers:
        while True:
            stored = _history(mesh, token, worker.session)
            missing = [r for r in worker.acknowledged if stored.count(r) < 2]
            if not missing or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        lost += missing
        doubled += sorted({r for r in stored if stored.count(r) > 2})
        order = list(dict.fromkeys(stored))
        acked_in_store = [r for r in order if r in set(worker.acknowledged)]
        if acked_in_store != worker.acknowledged:
            disordered.append(worker.session)
    _telemetry_settled(mesh, token)
    budget_codes = _budget_check(mesh, token)
    audit_chain = _audit_chain(mesh, token)
    acknowledged = sum(len(w.acknowledged) for w in workers)
    latencies = sorted(x for w in workers for x in w.latencies)
    errors: dict[str, int] = {}
    for worker in workers:
        for code, count in worker.errors.items():
            errors[code] = errors.get(code, 0) + count
    figures = {
        "replicas": REPLICAS,
        "workers": WORKERS,
        "seconds": round(elapsed, 1),
        "acknowledged": acknowledged,
        "errors": errors,
        "rps": round(acknowledged / elapsed, 1),
        "p50_ms": round(latencies[len(latencies) // 2] * 1000, 1) if latencies else 0,
        "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 1) if latencies else 0,
        "lost": len(lost),
        "doubled": len(doubled),
        "sessions_out_of_order": len(disordered),
        "budget_granted": budget_codes.get("OK", 0),
        "budget_refused": budget_codes.get("RESOURCE_EXHAUSTED", 0),
        "budget_codes": budget_codes,
        "audit_chain": audit_chain,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(figures, indent=2))
    assert acknowledged > 0, figures
    assert not lost, f"acknowledged turns lost: {lost[:5]} {figures}"
    assert not doubled, f"turns stored twice: {doubled[:5]}"
    assert not disordered, f"sessions out of order: {disordered}"
    assert budget_codes == {
        "OK": BUDGET_LIMIT,
        "RESOURCE_EXHAUSTED": BUDGET_RUNS - BUDGET_LIMIT,
    }, figures
    assert audit_chain.startswith("ok"), figures
