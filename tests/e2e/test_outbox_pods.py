"""Issue 15, part 3: in the production wiring (outboxes as PostgreSQL tables), a pod deleted
during a memory and telemetry outage loses nothing it acknowledged.

Real processes: memory and telemetry stop; Runs are acknowledged (their turns, usage records
and audit events wait in the gateway's outbox table), an admin change is made (its audit event
waits in auth's outbox table, committed with the change) and a release is started (the
router's audit events wait in its outbox table); the gateway, auth and the router get SIGKILL
and their data directories are deleted, as a pod's emptyDir is; new processes ("pods") start on
other data directories against the same databases; memory and telemetry come back; every
acknowledged item arrives exactly once.
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

from services.router.settings import DEFAULT_RULES_FILE
from testing.mesh import Mesh
from tests.pgutil import fresh_databases
from toolmesh.auth.v1 import auth_pb2, auth_pb2_grpc
from toolmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from toolmesh.router.v1 import router_pb2

T = TypeVar("T")
DB_SERVICES = ("auth", "router", "memory", "telemetry")
RUNS = 6
# A second routing rules version, mounted beside the packaged one, for a release to promote.
NEXT_RULES = "2027.01.01-1"


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
    rules = tmp_path / "rules.d"
    rules.mkdir()
    (rules / "next.toml").write_text(
        DEFAULT_RULES_FILE.read_text().replace('"2026.11.29-1"', f'"{NEXT_RULES}"')
    )
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
                "TOOLMESH_ROUTER_DATA_DIR": str(tmp_path / "router-pod-a"),
                "TOOLMESH_ROUTER_RULES_DIR": str(rules),
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


def test_deleted_gateway_auth_and_router_pods_lose_nothing_acknowledged(
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
    with mesh.channel("gateway") as channel:
        release = gateway_pb2_grpc.GatewayStub(channel).StartRelease(
            gateway_pb2.StartReleaseRequest(
                unit=router_pb2.ReleaseUnit(kind=router_pb2.RELEASE_UNIT_KIND_ROUTING),
                candidate_version=NEXT_RULES,
                plan=router_pb2.ReleasePlan(kind=router_pb2.RELEASE_PLAN_KIND_IMMEDIATE),
                reason="during the outage",
            ),
            metadata=bearer,
            timeout=15,
        )
    # Promoted at once, then watched for the monitoring period.
    assert release.release.state == router_pb2.RELEASE_STATE_MONITORING

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
    router_waiting = query(urls["router"], "SELECT key FROM router_outbox WHERE kind = 'audit'")
    router_events = {key.removeprefix("audit:") for (key,) in router_waiting}
    assert router_events, "the router's events (the release's gate) wait in its table"

    # The pods go: SIGKILL, and the gateway's data directory with them.
    mesh.stop("gateway", sig=signal.SIGKILL)
    mesh.stop("auth", sig=signal.SIGKILL)
    mesh.stop("router", sig=signal.SIGKILL)
    shutil.rmtree(mesh.data_dir / "gateway-pod-a")
    router_pod = mesh.data_dir / "router-pod-a"
    assert not list(router_pod.rglob("*outbox*")), "the router keeps no outbox on its pod"
    shutil.rmtree(router_pod, ignore_errors=True)
    # New pods, on other data directories, against the same databases.
    mesh.extra_env["TOOLMESH_GATEWAY_DATA_DIR"] = str(mesh.data_dir / "gateway-pod-b")
    mesh.extra_env["TOOLMESH_ROUTER_DATA_DIR"] = str(mesh.data_dir / "router-pod-b")
    mesh.start("auth")
    mesh.start("router")
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

    expected = audit_waiting | auth_events | router_events

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
    gate_events = query(
        urls["telemetry"],
        "SELECT COUNT(*) FROM telemetry_audit"
        " WHERE action = 'release.gate' AND details_json LIKE %s",
        f"%{release.release.id}%",
    )
    assert gate_events == [(1,)]

    # Nothing left waiting, and the new pod's data directory holds no outbox file.
    left = eventually(
        lambda: (
            query(urls["gateway"], "SELECT COUNT(*) FROM gateway_outbox")
            + query(urls["auth"], "SELECT COUNT(*) FROM auth_outbox")
            + query(urls["router"], "SELECT COUNT(*) FROM router_outbox")
        ),
        lambda counts: counts == [(0,), (0,), (0,)],
        timeout=15,
    )
    assert left == [(0,), (0,), (0,)]
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
