"""Issue 15, part 3: in the production wiring (outboxes as PostgreSQL tables), a pod deleted
during a memory and telemetry outage loses nothing it acknowledged.

Real processes: memory and telemetry stop; Runs are acknowledged (their turns, usage records
and audit events wait in the gateway's outbox table) and an admin change is made (its audit
event waits in auth's outbox table, committed with the change); the gateway and auth get
SIGKILL and the gateway's data directory is deleted, as a pod's emptyDir is; new gateway and
auth processes ("pods") start on other data directories against the same databases; memory and
telemetry come back; every acknowledged item arrives exactly once.
"""

from __future__ import annotations

import shutil
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import psycopg
import pytest
from sqlalchemy.engine import make_url

from testing.mesh import Mesh
from tests.pgutil import fresh_databases
from toolmesh.auth.v1 import auth_pb2, auth_pb2_grpc
from toolmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc

T = TypeVar("T")
DB_SERVICES = ("auth", "router", "memory", "telemetry")
RUNS = 6


def query(url: str, sql: str, *params: object) -> list[tuple[Any, ...]]:
    conninfo = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo) as conn:
        return conn.execute(sql, params).fetchall()  # type: ignore[arg-type]


def eventually(read: Callable[[], T], done: Callable[[T], bool], timeout: float = 60.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if done(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.3)


@pytest.fixture
def pods(tmp_path: Path) -> Iterator[tuple[Mesh, dict[str, str]]]:
    with fresh_databases(*DB_SERVICES, "gateway") as urls:
        mesh = Mesh(
            data_dir=tmp_path,
            database_urls={name: urls[name] for name in DB_SERVICES},
            extra_env={
                "TOOLMESH_GATEWAY_OUTBOX_URL": urls["gateway"],
                "TOOLMESH_GATEWAY_DATA_DIR": str(tmp_path / "gateway-pod-a"),
                # A claim of the killed pod must not hold its items for the default minute.
                "TOOLMESH_GATEWAY_OUTBOX_LEASE_S": "2",
                "TOOLMESH_AUTH_AUDIT_BACKOFF_MAX_S": "1",
                # "No budget applies" learnt before the outage stays trusted through it (else
                # no tool may run while the ledger is away).
                "TOOLMESH_GATEWAY_BUDGET_STATE_TTL_S": "600",
            },
        )
        mesh.start_all()
        try:
            yield mesh, urls
        finally:
            mesh.stop_all()


def test_a_deleted_gateway_and_auth_pod_lose_nothing_acknowledged(
    pods: tuple[Mesh, dict[str, str]],
) -> None:
    mesh, urls = pods
    token = mesh.token()
    bearer = (("authorization", f"Bearer {token}"),)
    with mesh.channel("gateway") as channel:
        warm_up = gateway_pb2_grpc.GatewayStub(channel).Run(
            gateway_pb2.RunRequest(session_id="warm-up", prompt="what is 1 + 1"),
            metadata=bearer,
            timeout=10,
        )

    # Outage: memory and telemetry go away.
    mesh.stop("memory", sig=signal.SIGKILL)
    mesh.stop("telemetry", sig=signal.SIGKILL)

    acknowledged: dict[str, str] = {}  # request id -> session
    with mesh.channel("gateway") as channel:
        gateway = gateway_pb2_grpc.GatewayStub(channel)
        for n in range(RUNS):
            session = f"pod-{n % 2}"
            try:
                reply = gateway.Run(
                    gateway_pb2.RunRequest(session_id=session, prompt=f"save a note: pod {n}"),
                    metadata=bearer,
                    timeout=10,
                )
            except grpc.RpcError:
                continue
            acknowledged[reply.request_id] = session
    assert len(acknowledged) >= RUNS - 1, "Runs must be acknowledged during the outage"

    with mesh.channel("auth") as channel:
        created = auth_pb2_grpc.AuthStub(channel).CreateClient(
            auth_pb2.CreateClientRequest(client_id="pod-bot", tenant="dev", roles=["reader"]),
            metadata=bearer,
            timeout=10,
        )
    assert created.client.client_id == "pod-bot"

    # What waits, and where: in the databases, not in a pod's files.
    waiting = query(urls["gateway"], "SELECT kind, key FROM gateway_outbox")
    kinds = Counter(kind for kind, _ in waiting)
    assert kinds["memory"] == len(acknowledged), kinds
    # The warm-up's usage record too, when the outage began before its delivery.
    assert len(acknowledged) <= kinds["usage"] <= len(acknowledged) + 1, kinds
    audit_waiting = {key.removeprefix("audit:") for kind, key in waiting if kind == "audit"}
    assert audit_waiting, "the Runs' audit events wait in the gateway's outbox table"
    auth_waiting = query(urls["auth"], "SELECT key FROM auth_outbox WHERE kind = 'audit'")
    auth_events = {key.removeprefix("audit:") for (key,) in auth_waiting}
    assert auth_events, "auth's events (the admin change's among them) wait in its table"

    # The pods go: SIGKILL, and the gateway's data directory with them.
    mesh.stop("gateway", sig=signal.SIGKILL)
    mesh.stop("auth", sig=signal.SIGKILL)
    shutil.rmtree(mesh.data_dir / "gateway-pod-a")
    # New pods, on another data directory, against the same databases.
    mesh.extra_env["TOOLMESH_GATEWAY_DATA_DIR"] = str(mesh.data_dir / "gateway-pod-b")
    mesh.start("auth")
    mesh.start("gateway")

    # The outage ends.
    mesh.start("telemetry")
    mesh.start("memory")

    turns = eventually(
        lambda: stored_turns(mesh, token, set(acknowledged.values())),
        lambda counts: all(counts[r] >= 2 for r in acknowledged),
    )
    assert {r: turns[r] for r in acknowledged} == dict.fromkeys(acknowledged, 2), (
        "every acknowledged turn (question and answer) stored exactly once"
    )

    runs = {*acknowledged, warm_up.request_id}

    def usage() -> Counter[str]:
        rows = query(
            urls["telemetry"],
            "SELECT request_id, COUNT(*) FROM telemetry_usage WHERE request_id = ANY(%s)"
            " GROUP BY request_id",
            list(runs),
        )
        return Counter(dict(rows))

    records = eventually(usage, lambda counts: set(counts) == runs)
    assert records == Counter(dict.fromkeys(runs, 1))

    expected = audit_waiting | auth_events

    def audit() -> Counter[str]:
        rows = query(
            urls["telemetry"],
            "SELECT event_id, COUNT(*) FROM telemetry_audit WHERE event_id = ANY(%s)"
            " GROUP BY event_id",
            list(expected),
        )
        return Counter(dict(rows))

    events = eventually(audit, lambda counts: set(counts) == expected)
    assert events == Counter(dict.fromkeys(expected, 1))
    created_events = query(
        urls["telemetry"],
        "SELECT COUNT(*) FROM telemetry_audit WHERE action = 'admin.client.create'"
        " AND target = 'pod-bot'",
    )
    assert created_events == [(1,)]

    # Nothing left waiting, and the new pod's data directory holds no outbox file.
    left = eventually(
        lambda: (
            query(urls["gateway"], "SELECT COUNT(*) FROM gateway_outbox")
            + query(urls["auth"], "SELECT COUNT(*) FROM auth_outbox")
        ),
        lambda counts: counts == [(0,), (0,)],
        timeout=15,
    )
    assert left == [(0,), (0,)]
    assert not (mesh.data_dir / "gateway-pod-b" / "gateway-outbox.db").exists()


def stored_turns(mesh: Mesh, token: str, sessions: set[str]) -> Counter[str]:
    """Turns per request id over the sessions (empty while memory is not back)."""
    counts: Counter[str] = Counter()
    with mesh.channel("gateway") as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        for session in sessions:
            try:
                reply = stub.GetHistory(
                    gateway_pb2.GetHistoryRequest(session_id=session, limit=1000),
                    metadata=(("authorization", f"Bearer {token}"),),
                    timeout=5,
                )
            except grpc.RpcError:
                return Counter()
            counts.update(turn.request_id for turn in reply.turns)
    return counts
