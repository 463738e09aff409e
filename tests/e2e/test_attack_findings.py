"""The findings of the outside attack (issue 9, and issue 10 item 4), each replayed against
the real five processes of a mutual-TLS mesh with four tenants, on SQLite and PostgreSQL.

One mesh per backend serves the whole module: each test works in tenants, clients and
sessions of its own, so the tests hold in any order. The gateway's per-tenant bulkhead is
lowered (12 Runs in flight, no admission wait) so that one tenant's flood is visibly refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc
import jwt
import psycopg
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc import aio
from sqlalchemy.engine import make_url

from services.telemetry.audit import GENESIS, event_hash
from testing.mesh import Mesh
from tests.e2e.conftest import DB_SERVICES, bearer
from tests.e2e.test_security import Forger, cli, create_client, issue, ok
from tests.pgutil import fresh_databases
from tests.wire import raw_call
from toolmesh.auth.v1 import auth_pb2, auth_pb2_grpc
from toolmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from toolmesh.telemetry.v1 import telemetry_pb2, telemetry_pb2_grpc

pytestmark = pytest.mark.e2e

T = TypeVar("T")
TENANT_LIMIT = 12
TENANTS = ("dev", "acme", "globex", "noisy", "flood", "thrifty", "aud-rw", "aud-tr", "aud-wp")
POLICY = (
    '\nversion = "attack-findings.1"\n\n[roles]\nreader = ["tools:read"]\n'
    'writer = ["tools:read", "tools:write"]\noperator = ["ops:read"]\n'
    'admin = ["tools:read", "tools:write", "ops:read", "admin"]\n'
    'platform-operator = ["tools:read", "tools:write", "ops:read", "admin", "platform:admin"]\n'
    + "".join(f'\n[tenants.{t}]\nallowed_tools = ["*"]\n' for t in TENANTS)
)
RUN = "/toolmesh.gateway.v1.Gateway/Run"


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def amesh(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Mesh]:
    data_dir = tmp_path_factory.mktemp(f"mesh-attack-{request.param}")
    policy = data_dir / "policy.toml"
    policy.write_text(POLICY)
    env = {
        "TOOLMESH_AUTH_POLICY_FILE": str(policy),
        "TOOLMESH_GATEWAY_MAX_INFLIGHT_PER_TENANT": str(TENANT_LIMIT),
        "TOOLMESH_GATEWAY_ADMISSION_WAIT_MS": "0",
    }
    with contextlib.ExitStack() as stack:
        urls = (
            stack.enter_context(fresh_databases(*DB_SERVICES))
            if request.param == "postgres"
            else {}
        )
        mesh = Mesh(data_dir=data_dir, database_urls=urls, tls=True, extra_env=env)
        mesh.start_all()
        try:
            yield mesh
        finally:
            mesh.stop_all()


# --- helpers ------------------------------------------------------------------------------


def eventually(check: Callable[[], T | None], timeout: float = 20.0, what: str = "") -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"never true: {what}"
        time.sleep(0.2)


def client_token(mesh: Mesh, tenant: str, scopes: str = "", roles: str = "") -> tuple[str, str]:
    """A fresh client of ``tenant`` and a token of it: (client id, token)."""
    client_id, secret = create_client(mesh, tenant, scopes=scopes, roles=roles)
    return client_id, issue(mesh, client_id, secret)


def details_of(err: grpc.RpcError) -> dict[str, Any]:
    """The google.rpc details of an error, by type name."""
    found: dict[str, Any] = {}
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                for kind in (error_details_pb2.RetryInfo, error_details_pb2.BadRequest):
                    message = kind()
                    if detail.Unpack(message):
                        found[kind.DESCRIPTOR.name] = message
    return found


def sql(mesh: Mesh, statement: str, *params: Any) -> list[dict[str, Any]]:
    """Runs one statement on telemetry's database behind its back (``?`` placeholders)."""
    url = mesh.database_urls.get("telemetry")
    if url:
        conninfo = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        with psycopg.connect(conninfo) as pg:
            done = pg.execute(statement.replace("?", "%s"), params)
            names = [c.name for c in done.description or ()]
            rows = done.fetchall() if names else []
    else:
        with sqlite3.connect(mesh.data_dir / "telemetry.db") as lite:
            cursor = lite.execute(statement, params)
            names = [c[0] for c in cursor.description or ()]
            rows = cursor.fetchall() if names else []
    return [dict(zip(names, row, strict=True)) for row in rows]


async def fire(
    mesh: Mesh, token: str, requests: list[gateway_pb2.RunRequest], timeout: float = 30
) -> list[tuple[gateway_pb2.RunResponse | aio.AioRpcError, float]]:
    """All ``requests`` at once; each answer (or error) with its latency in seconds."""
    async with aio.secure_channel(mesh.gateway, mesh.credentials()) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)

        async def one(request: gateway_pb2.RunRequest) -> tuple[Any, float]:
            start = time.monotonic()
            try:
                reply = await stub.Run(request, metadata=bearer(token), timeout=timeout)
            except aio.AioRpcError as err:
                return err, time.monotonic() - start
            return reply, time.monotonic() - start

        return list(await asyncio.gather(*(one(r) for r in requests)))


async def paced(mesh: Mesh, token: str, count: int) -> list[tuple[Any, float]]:
    """``count`` Runs one after the other (a well-behaved tenant), with their latencies."""
    results = []
    for n in range(count):
        results += await fire(
            mesh, token, [gateway_pb2.RunRequest(session_id=f"calm-{n}", prompt=f"what is {n} + 1")]
        )
    return results


def _session() -> str:
    return f"atk-{uuid.uuid4().hex[:10]}"


# --- finding 2: linear-time routing, one tenant cannot starve the others --------------------

ADVERSARIAL = [
    "what is " + "1" * 3990 + "x",
    "convert 1 km to " * 250,
    "what is " + "1 + " * 997 + "x",
    "what is " + "(" * 3990 + "1",
    "convert " + "1" * 3975 + " km to miles?",
    "what is " + "-1" * 1995,
    "what time is it in " + "a/" * 1985 + "!",
    "what is " + "1." * 1995 + "x",
    "convert 1 " + "km " * 1329 + "to",
    "what is " + "1e" * 1995 + "x",
    "list my notes " * 285,
    "what is " + "9" * 3000 + " * " + "9" * 980 + "x",
]


def test_adversarial_prompts_do_not_delay_another_tenant(amesh: Mesh) -> None:
    """Before: each such prompt cost the router 0.4-1.1 s of event-loop time; a dozen made
    other tenants wait 2-4 s and opened the gateway's router breaker for everyone."""
    _, noisy = client_token(amesh, "noisy", scopes="tools:read")
    _, calm = client_token(amesh, "dev", scopes="tools:read")
    assert all(len(p) <= 4000 for p in ADVERSARIAL)
    attack = [gateway_pb2.RunRequest(session_id=_session(), prompt=p) for p in ADVERSARIAL]

    async def both() -> tuple[list[tuple[Any, float]], list[tuple[Any, float]]]:
        flood, others = await asyncio.gather(fire(amesh, noisy, attack), paced(amesh, calm, 8))
        return flood, others

    flood, others = asyncio.run(both())
    for reply, latency in others:
        assert isinstance(reply, gateway_pb2.RunResponse), reply
        assert reply.outcome == gateway_pb2.OUTCOME_TOOL_ANSWERED, reply
        assert "router" not in reply.degraded
        assert latency < 1.5, f"another tenant waited {latency:.2f}s"
    for reply, latency in flood:
        # Routed (an answer, a no-match, or a tool refusing the arguments): no dependency,
        # least of all the router, degraded, and no timeout.
        assert isinstance(reply, gateway_pb2.RunResponse), reply
        assert list(reply.degraded) == [], (reply.degraded, reply.answer)
        assert latency < 2.0, f"an adversarial prompt took {latency:.2f}s"
    # The router breaker is still closed for everyone.
    ((after, _),) = asyncio.run(
        fire(amesh, calm, [gateway_pb2.RunRequest(session_id="calm-x", prompt="what is 3 * 3")])
    )
    assert isinstance(after, gateway_pb2.RunResponse) and not after.degraded
    assert after.outcome == gateway_pb2.OUTCOME_TOOL_ANSWERED


def test_a_tenant_over_its_concurrency_limit_is_refused_while_another_is_served(
    amesh: Mesh,
) -> None:
    _, flood = client_token(amesh, "flood", scopes="tools:read")
    _, calm = client_token(amesh, "globex", scopes="tools:read")
    burst = [
        gateway_pb2.RunRequest(session_id=_session(), prompt=f"what is {n} * 7") for n in range(90)
    ]

    async def both() -> tuple[list[tuple[Any, float]], list[tuple[Any, float]]]:
        shed, others = await asyncio.gather(fire(amesh, flood, burst), paced(amesh, calm, 6))
        return shed, others

    shed, others = asyncio.run(both())
    refused = [r for r, _ in shed if isinstance(r, aio.AioRpcError)]
    served = [r for r, _ in shed if isinstance(r, gateway_pb2.RunResponse)]
    assert refused and served, (len(refused), len(served))
    for err in refused:
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (err.code(), err.details())
        assert "tenant flood" in (err.details() or ""), err.details()
        retry = details_of(err)["RetryInfo"]
        assert retry.retry_delay.ToNanoseconds() > 0
    for reply, _ in others:
        assert isinstance(reply, gateway_pb2.RunResponse), reply
        assert reply.outcome == gateway_pb2.OUTCOME_TOOL_ANSWERED


# --- finding 3: an idempotency key is bound to the request's content ------------------------


def test_an_idempotency_key_replays_only_its_own_request(amesh: Mesh) -> None:
    """Before: a reused key ran new prompts (unbudgeted, unrecorded) under the old request id,
    and ten concurrent reuses ran the tool ten times."""
    client_id, token = client_token(amesh, "acme", scopes="tools:read")
    session, key = _session(), f"k-{uuid.uuid4().hex}"
    first_request = gateway_pb2.RunRequest(
        session_id=session, prompt="what is 6 * 7", idempotency_key=key
    )
    with amesh.channel("gateway") as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        first = stub.Run(first_request, metadata=bearer(token), timeout=10)
        again = stub.Run(first_request, metadata=bearer(token), timeout=10)
        assert (first.replayed, again.replayed) == (False, True)
        assert (again.request_id, again.answer) == (first.request_id, first.answer)
        assert "42" in first.answer
        for changed in (
            gateway_pb2.RunRequest(session_id=session, prompt="what is 6 * 8", idempotency_key=key),
            gateway_pb2.RunRequest(
                session_id=_session(), prompt="what is 6 * 7", idempotency_key=key
            ),
        ):
            with pytest.raises(grpc.RpcError) as err:
                stub.Run(changed, metadata=bearer(token), timeout=10)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value.details()
            assert "idempotency key" in (err.value.details() or "")

    # Ten concurrent reuses of a new key: one runs, the others replay it or are told to retry.
    burst_session, burst_key = _session(), f"k-{uuid.uuid4().hex}"
    same = gateway_pb2.RunRequest(
        session_id=burst_session, prompt="what is 7 * 7", idempotency_key=burst_key
    )
    results = [r for r, _ in asyncio.run(fire(amesh, token, [same] * 10))]
    replies = [r for r in results if isinstance(r, gateway_pb2.RunResponse)]
    for err in (r for r in results if isinstance(r, aio.AioRpcError)):
        assert err.code() == grpc.StatusCode.ABORTED, (err.code(), err.details())
        assert "RetryInfo" in details_of(err)
    assert [r.replayed for r in replies].count(False) == 1, [r.replayed for r in replies]
    assert len({(r.request_id, r.answer) for r in replies}) == 1
    ran = replies[0].request_id

    with amesh.channel("gateway") as channel:
        history = gateway_pb2_grpc.GatewayStub(channel).GetHistory(
            gateway_pb2.GetHistoryRequest(session_id=burst_session),
            metadata=bearer(token),
            timeout=10,
        )
    assert len(history.turns) == 2

    def usage() -> list[dict[str, Any]] | None:
        rows = sql(
            amesh,
            "SELECT request_id, outcome, tool_calls FROM telemetry_usage WHERE principal = ?",
            client_id,
        )
        return rows if sum(r["tool_calls"] for r in rows) >= 2 else None

    # Two requests ran a tool: two charged usage records. The replays charged nothing; the
    # refused reuses are on record as refusals that ran nothing.
    rows = eventually(usage, what="usage records")
    charged = sorted((r["request_id"], r["tool_calls"]) for r in rows if r["outcome"] != "refused")
    assert charged == sorted([(first.request_id, 1), (ran, 1)]), rows
    assert all(r["tool_calls"] == 0 for r in rows if r["outcome"] == "refused"), rows


# --- finding 4: a refused request's audit event arrives whatever its request id -------------


def _audit(mesh: Mesh, token: str, action: str) -> list[telemetry_pb2.StoredAuditEvent]:
    with mesh.channel("gateway") as channel:
        reply = gateway_pb2_grpc.GatewayStub(channel).ListAudit(
            gateway_pb2.ListAuditRequest(action=action, limit=200),
            metadata=bearer(token),
            timeout=10,
        )
    return list(reply.events)


def test_a_long_or_unprintable_request_id_does_not_drop_the_refusals_audit(amesh: Mesh) -> None:
    """Before: an x-request-id over 256 characters made auth.failure and permission.denied
    undeliverable, and the outbox dropped them."""
    forger = Forger(amesh)
    jti = uuid.uuid4().hex
    past = int(time.time()) - 900
    expired = forger.token(iat=past, nbf=past, exp=past + 300, jti=jti)
    long_id = "rid-" + "z" * 600
    answer = raw_call(
        amesh.ports["gateway"],
        RUN,
        gateway_pb2.RunRequest(session_id="rid", prompt="what is 1 + 1").SerializeToString(),
        headers=(
            (b"authorization", b"Bearer " + expired.encode()),
            (b"x-request-id", b"rid-\x01\x7f\xff" + b"y" * 400),
        ),
        ca_file=amesh.certs / "ca.pem",
    )
    assert answer["grpc-status"] == str(grpc.StatusCode.UNAUTHENTICATED.value[0]), answer
    reader_id, reader = client_token(amesh, "dev", scopes="tools:read")
    with amesh.channel("gateway") as channel:
        with pytest.raises(grpc.RpcError) as err:
            gateway_pb2_grpc.GatewayStub(channel).Run(
                gateway_pb2.RunRequest(session_id=_session(), prompt="save a note: rid test"),
                metadata=(*bearer(reader), ("x-request-id", long_id)),
                timeout=10,
            )
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    admin = amesh.token()

    def arrived() -> tuple[Any, Any] | None:
        failures = [e for e in _audit(amesh, admin, "auth.failure") if jti in e.event.details_json]
        denials = [
            e for e in _audit(amesh, admin, "permission.denied") if e.event.actor == reader_id
        ]
        return (failures[0], denials[0]) if failures and denials else None

    for stored in eventually(arrived, what="both refusals in the audit"):
        rid = stored.event.request_id
        assert len(rid) <= 256 and "zzzz" not in rid and "yyyy" not in rid, rid
        assert all(ch.isprintable() for ch in rid), rid
    with amesh.channel("gateway") as channel:
        verdict = gateway_pb2_grpc.GatewayStub(channel).VerifyAudit(
            gateway_pb2.VerifyAuditRequest(), metadata=bearer(admin), timeout=10
        )
    assert verdict.ok and verdict.dead_letter_notices == 0, verdict


# --- finding 5: a rewritten, truncated or wiped chain is found after a checkpoint -----------


def _quiet_chain(mesh: Mesh, token: str, at_least: int) -> int:
    """The tenant's head seq once its events stopped arriving (auth sends them through its
    outbox)."""
    seen: list[int] = []

    def settled() -> int | None:
        with mesh.channel("gateway") as channel:
            reply = gateway_pb2_grpc.GatewayStub(channel).VerifyAudit(
                gateway_pb2.VerifyAuditRequest(), metadata=bearer(token), timeout=10
            )
        assert reply.ok, reply
        seen.append(reply.head_seq)
        quiet = len(seen) >= 3 and seen[-1] == seen[-3] >= at_least
        return reply.head_seq if quiet else None

    return eventually(settled, what="a quiet chain")


def _rehash(mesh: Mesh, tenant: str) -> None:
    """Recomputes ``tenant``'s chain and head, as someone who knows the format would."""
    rows = sql(mesh, "SELECT * FROM telemetry_audit WHERE tenant = ? ORDER BY seq", tenant)
    prev = GENESIS
    for row in rows:
        digest = event_hash(row["seq"], prev, row)
        sql(
            mesh,
            "UPDATE telemetry_audit SET prev_hash = ?, hash = ? WHERE id = ?",
            prev,
            digest,
            row["id"],
        )
        prev = digest
    sql(
        mesh,
        "UPDATE telemetry_audit_heads SET seq = ?, hash = ? WHERE tenant = ?",
        rows[-1]["seq"],
        prev,
        tenant,
    )


@pytest.mark.parametrize(
    ("tenant", "kind"),
    [
        ("aud-rw", telemetry_pb2.AUDIT_PROBLEM_KIND_REWRITTEN),
        ("aud-tr", telemetry_pb2.AUDIT_PROBLEM_KIND_TRUNCATED),
        ("aud-wp", telemetry_pb2.AUDIT_PROBLEM_KIND_WIPED),
    ],
)
def test_a_rewritten_truncated_or_wiped_chain_is_found(amesh: Mesh, tenant: str, kind: int) -> None:
    """Before: edits with a recomputed chain, a cut tail and a wiped chain all verified ok."""
    admin_id, admin_secret = create_client(amesh, tenant, roles="admin")
    admin = issue(amesh, admin_id, admin_secret)
    for _ in range(4):
        issue(amesh, admin_id, admin_secret)  # token.issue events in the tenant's chain
    head = _quiet_chain(amesh, admin, at_least=5)
    with amesh.channel("gateway") as channel:
        signed = (
            gateway_pb2_grpc.GatewayStub(channel)
            .CheckpointAudit(
                gateway_pb2.CheckpointAuditRequest(), metadata=bearer(admin), timeout=10
            )
            .checkpoint
        )
    assert (signed.tenant, signed.seq) == (tenant, head)

    if kind == telemetry_pb2.AUDIT_PROBLEM_KIND_REWRITTEN:
        sql(
            amesh,
            "UPDATE telemetry_audit SET outcome = 'denied' WHERE tenant = ? AND seq = 2",
            tenant,
        )
        _rehash(amesh, tenant)
    elif kind == telemetry_pb2.AUDIT_PROBLEM_KIND_TRUNCATED:
        sql(amesh, "DELETE FROM telemetry_audit WHERE tenant = ? AND seq > ?", tenant, head - 2)
        _rehash(amesh, tenant)
    else:
        sql(amesh, "DELETE FROM telemetry_audit WHERE tenant = ?", tenant)
        sql(amesh, "DELETE FROM telemetry_audit_heads WHERE tenant = ?", tenant)
    with amesh.channel("gateway") as channel:
        verdict = gateway_pb2_grpc.GatewayStub(channel).VerifyAudit(
            gateway_pb2.VerifyAuditRequest(), metadata=bearer(admin), timeout=10
        )
    assert not verdict.ok
    assert verdict.problem.kind == kind, verdict.problem
    assert verdict.last_checkpoint.seq == head
    # The operator's command says the same, and exits non-zero.
    result = cli(amesh, "audit", "verify", token=admin)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    name = telemetry_pb2.AuditProblemKind.Name(kind).removeprefix("AUDIT_PROBLEM_KIND_")
    assert name.lower() in (result.stdout + result.stderr).lower(), result


# --- finding 6: admin rights are per tenant; the platform operator's span all ---------------


def test_tenant_admin_is_confined_and_the_platform_operator_is_not(amesh: Mesh) -> None:
    _, acme_admin = client_token(amesh, "acme", roles="admin")
    globex_id, globex_admin = client_token(amesh, "globex", roles="admin")
    platform = amesh.token()
    budget = gateway_pb2.SetBudgetRequest(
        tenant="globex",
        period=telemetry_pb2.BUDGET_PERIOD_DAY,
        limits=telemetry_pb2.BudgetAmounts(tool_calls=1),
    )
    with amesh.channel("gateway") as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.SetBudget(budget, metadata=bearer(acme_admin), timeout=10)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as err:
            stub.SetBudget(budget, metadata=bearer(globex_admin), timeout=10)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED  # its own: no tenant field
        budget.principal = globex_id
        reply = stub.SetBudget(budget, metadata=bearer(platform), timeout=10)
        assert (reply.budget.tenant, reply.budget.principal) == ("globex", globex_id)
        listed = stub.ListBudgets(gateway_pb2.ListBudgetsRequest(), metadata=bearer(globex_admin))
        assert [b.principal for b in listed.budgets] == [globex_id]
        mine = stub.ListBudgets(gateway_pb2.ListBudgetsRequest(), metadata=bearer(acme_admin))
        assert globex_id not in {b.principal for b in mine.budgets}
        budget.limits.tool_calls = 0
        assert stub.SetBudget(budget, metadata=bearer(platform), timeout=10).removed

    with amesh.channel("auth") as channel:
        auth = auth_pb2_grpc.AuthStub(channel)
        for call, request in (
            (auth.ListClients, auth_pb2.ListClientsRequest(tenant="globex")),
            (auth.CreateClient, auth_pb2.CreateClientRequest(tenant="globex", roles=["admin"])),
        ):
            with pytest.raises(grpc.RpcError) as err:
                call(request, metadata=bearer(acme_admin), timeout=10)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        listed_clients = auth.ListClients(
            auth_pb2.ListClientsRequest(tenant="globex"), metadata=bearer(platform), timeout=10
        )
        assert globex_id in {c.client_id for c in listed_clients.clients}


def test_stats_show_only_the_callers_tenant(amesh: Mesh) -> None:
    """Before: any ops:read holder saw every tenant's tool counts."""
    _, acme = client_token(amesh, "acme", scopes="tools:read ops:read")
    _, globex = client_token(amesh, "globex", scopes="tools:read ops:read")
    asyncio.run(
        fire(
            amesh,
            acme,
            [gateway_pb2.RunRequest(session_id=_session(), prompt="convert 5 km to miles")] * 4,
        )
    )
    asyncio.run(
        fire(
            amesh,
            globex,
            [gateway_pb2.RunRequest(session_id=_session(), prompt="convert 7 km to miles")],
        )
    )

    def converts(token: str) -> int:
        with amesh.channel("gateway") as channel:
            rows = (
                gateway_pb2_grpc.GatewayStub(channel)
                .GetStats(
                    gateway_pb2.GetStatsRequest(group_by=telemetry_pb2.STATS_GROUP_BY_TOOL),
                    metadata=bearer(token),
                    timeout=10,
                )
                .rows
            )
        return sum(r.count for r in rows if r.tool_name == "unit_convert")

    eventually(lambda: converts(acme) >= 4 and converts(globex) >= 1, what="stats")
    assert converts(globex) == 1


# --- finding 7: a caller's trace context is a claim, not a parent ---------------------------


def test_a_callers_traceparent_neither_joins_nor_silences_a_trace(amesh: Mesh) -> None:
    _, dev = client_token(amesh, "dev", scopes="tools:read")
    _, intruder = client_token(amesh, "acme", scopes="tools:read tools:write ops:read")
    with amesh.channel("gateway") as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        victim = stub.Run(
            gateway_pb2.RunRequest(session_id=_session(), prompt="what is 8 + 8"),
            metadata=bearer(dev),
            timeout=10,
        )
        joined = stub.Run(
            gateway_pb2.RunRequest(session_id=_session(), prompt="what is 9 + 9"),
            metadata=(*bearer(intruder), ("traceparent", f"00-{victim.trace_id}-{'ab' * 8}-01")),
            timeout=10,
        )
        assert joined.trace_id != victim.trace_id
        # A write Run whose caller asks for no sampling is still recorded.
        unsampled = stub.Run(
            gateway_pb2.RunRequest(session_id=_session(), prompt="save a note: keep this trace"),
            metadata=(*bearer(intruder), ("traceparent", f"00-{'cd' * 16}-{'ef' * 8}-00")),
            timeout=10,
        )
        assert unsampled.tool_name == "save_note" and unsampled.trace_id != "cd" * 16

        def spans(trace_id: str, token: str) -> list[Any]:
            try:
                return list(
                    stub.GetTrace(
                        gateway_pb2.GetTraceRequest(trace_id=trace_id),
                        metadata=bearer(token),
                        timeout=10,
                    ).spans
                )
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.NOT_FOUND, err
                return []

        eventually(lambda: spans(unsampled.trace_id, intruder), what="the unsampled write's spans")
        eventually(lambda: spans(joined.trace_id, intruder), what="the intruder's own trace")
        assert {s.tenant for s in spans(joined.trace_id, intruder)} <= {"acme", ""}
        assert spans(victim.trace_id, intruder) == []
        assert spans("cd" * 16, intruder) == []


# --- finding 9: Runs that match no tool are budget-checked too ------------------------------


def test_no_match_runs_are_held_to_a_token_budget(amesh: Mesh) -> None:
    """Before: 40 no-match Runs of 999 words used 41,320 tokens against a limit of 50: a Run
    that matched no tool was never checked. This mesh has no model, so the tokens are spent by
    an earlier (model) request's usage record, recorded as the gateway would."""
    client_id, token = client_token(amesh, "thrifty", scopes="tools:read")
    wordy = gateway_pb2.RunRequest(session_id=_session(), prompt=" ".join(["lorem"] * 600))
    budget = gateway_pb2.SetBudgetRequest(
        tenant="thrifty",
        principal=client_id,
        period=telemetry_pb2.BUDGET_PERIOD_DAY,
        limits=telemetry_pb2.BudgetAmounts(tokens=50),
    )
    with amesh.channel("gateway") as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        stub.SetBudget(budget, metadata=bearer(amesh.token()), timeout=10)
        # Under the limit, a no-match Run is answered.
        reply = stub.Run(wordy, metadata=bearer(token), timeout=10)
        assert reply.outcome == gateway_pb2.OUTCOME_NO_MATCH, reply
        record = telemetry_pb2.UsageRecord(
            request_id=uuid.uuid4().hex,
            tenant="thrifty",
            principal=client_id,
            route=RUN,
            tokens_in=41_000,
            tokens_out=320,
            outcome="ok",
        )
        record.occurred_at.FromNanoseconds(time.time_ns())
        with amesh.channel("telemetry", "gateway") as inner:
            telemetry_pb2_grpc.TelemetryStub(inner).RecordUsage(
                telemetry_pb2.RecordUsageRequest(records=[record]), timeout=10
            )

        def refused() -> grpc.RpcError | None:
            try:
                stub.Run(wordy, metadata=bearer(token), timeout=10)
            except grpc.RpcError as err:
                return err
            return None

        # The gateway trusts "within budget" for at most budget_state_ttl_s (5 s).
        err = eventually(refused, timeout=15, what="a no-match Run refused over the budget")
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
    assert "tokens limit 50" in (err.details() or ""), err.details()
    assert "RetryInfo" in details_of(err)


# --- finding 10: wrong secrets from one address do not lock the owner out of another -------


class SourceProxy:
    """Forwards 127.0.0.1:<port> to the gateway from source address ``source``, so that the
    gateway (and the auth it forwards the caller's address to) sees another caller address."""

    def __init__(self, target_port: int, source: str) -> None:
        self.target_port, self.source, self.port = target_port, source, 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> SourceProxy:
        self._thread.start()
        assert self._ready.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _close(self) -> None:
        self._server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _run(self) -> None:
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", 0)
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(
            "127.0.0.1", self.target_port, local_addr=(self.source, 0)
        )
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while chunk := await reader.read(65536):
                writer.write(chunk)
                await writer.drain()
        with contextlib.suppress(ConnectionError, OSError):
            writer.close()


def _issue_at(mesh: Mesh, port: int, client_id: str, secret: str) -> grpc.StatusCode:
    target = f"127.0.0.1:{port}"
    with grpc.secure_channel(target, mesh.credentials()) as channel:
        try:
            gateway_pb2_grpc.GatewayStub(channel).IssueToken(
                gateway_pb2.IssueTokenRequest(client_id=client_id, client_secret=secret), timeout=10
            )
        except grpc.RpcError as err:
            return err.code()
    return grpc.StatusCode.OK


def test_wrong_secrets_from_one_address_do_not_lock_the_owner_out(amesh: Mesh) -> None:
    """Before: anyone who knew a client id locked it out with a few wrong secrets."""
    client_id, secret = create_client(amesh, "dev", scopes="tools:read")
    with SourceProxy(amesh.ports["gateway"], "127.0.0.2") as attacker:
        codes = [_issue_at(amesh, attacker.port, client_id, "wrong-" + "x" * 40) for _ in range(8)]
        assert codes[0] == grpc.StatusCode.UNAUTHENTICATED
        assert codes[-1] == grpc.StatusCode.RESOURCE_EXHAUSTED, codes
        # The right secret from the attacker's address is throttled too...
        assert (
            _issue_at(amesh, attacker.port, client_id, secret) == grpc.StatusCode.RESOURCE_EXHAUSTED
        )
    # ...but the owner, from its own address, still gets its token.
    assert _issue_at(amesh, amesh.ports["gateway"], client_id, secret) == grpc.StatusCode.OK


# --- finding 12: one token verifier, one answer ---------------------------------------------


def test_odd_claims_are_unauthenticated_and_audited_alike_by_gateway_and_auth(amesh: Mesh) -> None:
    forger = Forger(amesh)
    now = int(time.time())
    jtis = {name: uuid.uuid4().hex for name in ("exp", "iat", "aud")}
    tokens = {
        "exp": forger.token(exp=str(now + 300), jti=jtis["exp"]),
        "iat": forger.token(iat=[now], jti=jtis["iat"]),
        "aud": forger.token(aud=["toolmesh", "someone-else"], jti=jtis["aud"]),
    }
    with amesh.channel("gateway") as gw, amesh.channel("auth") as au:
        gateway, auth = gateway_pb2_grpc.GatewayStub(gw), auth_pb2_grpc.AuthStub(au)
        for name, token in tokens.items():
            for call, request in (
                (gateway.ListTools, gateway_pb2.ListToolsRequest()),
                (auth.ListClients, auth_pb2.ListClientsRequest()),
            ):
                with pytest.raises(grpc.RpcError) as err:
                    call(request, metadata=bearer(token), timeout=10)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, (
                    name,
                    err.value.details(),
                )
    admin = amesh.token()

    def audited() -> bool:
        details = " ".join(e.event.details_json for e in _audit(amesh, admin, "auth.failure"))
        return all(jti in details for jti in jtis.values())

    eventually(audited, what="auth.failure for each odd token")

    # A disabled client's right secret answers exactly like a wrong one.
    disabled_id, disabled_secret = create_client(amesh, "dev", scopes="tools:read")
    ok(cli(amesh, "clients", "disable", disabled_id))
    enabled_id, _ = create_client(amesh, "dev", scopes="tools:read")
    answers = []
    with amesh.channel("gateway") as channel:
        for client_id, secret in (
            (disabled_id, disabled_secret),
            (enabled_id, "wrong-" + "y" * 40),
        ):
            with pytest.raises(grpc.RpcError) as err:
                gateway_pb2_grpc.GatewayStub(channel).IssueToken(
                    gateway_pb2.IssueTokenRequest(client_id=client_id, client_secret=secret),
                    timeout=10,
                )
            answers.append((err.value.code(), err.value.details(), details_of(err.value)))
    assert answers[0] == answers[1]


# --- issue 10 item 4: idempotent revocation, capped violations ------------------------------


def test_concurrent_revocation_is_idempotent_and_violations_are_capped(amesh: Mesh) -> None:
    victim = issue(amesh, *create_client(amesh, "dev", scopes="tools:read"))
    jti = jwt.decode(victim, options={"verify_signature": False})["jti"]
    admin = amesh.token()

    async def revoke_twenty() -> list[Any]:
        async with aio.secure_channel(amesh.target("auth"), amesh.credentials()) as channel:
            stub = auth_pb2_grpc.AuthStub(channel)

            async def one() -> Any:
                try:
                    return await stub.RevokeToken(
                        auth_pb2.RevokeTokenRequest(token_id=jti),
                        metadata=bearer(admin),
                        timeout=15,
                    )
                except aio.AioRpcError as err:
                    return err

            return list(await asyncio.gather(*(one() for _ in range(20))))

    results = asyncio.run(revoke_twenty())
    errors = [(r.code(), r.details()) for r in results if isinstance(r, aio.AioRpcError)]
    assert errors == []

    with amesh.channel("auth") as channel:
        with pytest.raises(grpc.RpcError) as err:
            auth_pb2_grpc.AuthStub(channel).CreateClient(
                auth_pb2.CreateClientRequest(
                    tenant="dev", scopes=[f"bad scope {n} \x01" for n in range(5000)]
                ),
                metadata=bearer(admin),
                timeout=15,
            )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    violations = details_of(err.value)["BadRequest"].field_violations
    assert 1 <= len(violations) <= 100, len(violations)
    trailer = sum(len(k) + len(v) for k, v in err.value.trailing_metadata() or ())
    assert trailer < 8192, trailer
