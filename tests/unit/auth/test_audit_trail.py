"""Auth's audit events reach telemetry's hash-chained trail: once each, without secrets, and
after a telemetry outage (the event waits in auth's outbox while the admin change succeeds)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry import trace

from services.kit.channels import open_channel
from services.kit.outbox import Item
from services.kit.outbox_table import TableOutbox
from services.kit.server import Cleanup, Running, start
from services.telemetry.app import build as build_telemetry
from services.telemetry.settings import TelemetrySettings
from toolmesh.auth.v1 import auth_pb2
from toolmesh.common.v1 import common_pb2
from toolmesh.telemetry.v1 import telemetry_pb2, telemetry_pb2_grpc

from .conftest import AuthServer, bearer, code_of, make_settings

CONTRACTS = ["toolmesh.auth.v1"]


class Telemetry:
    """A real telemetry server in-process; restartable on the same port and data dir."""

    def __init__(self, data_dir: Path, port: int = 0) -> None:
        self.data_dir = data_dir
        self.port = port
        self.running: Running | None = None

    async def start(self) -> Telemetry:
        settings = TelemetrySettings(port=self.port, data_dir=self.data_dir, metrics_port=0)
        cleanups: list[Cleanup] = []
        self.running = await start(settings, build_telemetry(settings, cleanups))
        self.running.cleanups.extend(cleanups)
        self.port = self.running.port
        self.channel = open_channel(self.address)
        self.stub = telemetry_pb2_grpc.TelemetryStub(self.channel)
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self) -> None:
        if self.running is not None:
            await self.channel.close()
            await self.running.stop(0)
            self.running = None

    async def events(self, tenant: str) -> list[telemetry_pb2.AuditEvent]:
        caller = common_pb2.Caller(subject="auditor", tenant=tenant)
        # wait_for_ready: right after a restart the channel may still be backing off.
        reply = await self.stub.ListAudit(
            telemetry_pb2.ListAuditRequest(caller=caller, limit=1000),
            wait_for_ready=True,
            timeout=10,
        )
        return [stored.event for stored in reply.events]

    async def wait_for(self, tenant: str, count: int, timeout: float = 15.0) -> list[Any]:
        deadline = time.monotonic() + timeout
        while True:
            events = await self.events(tenant)
            if len(events) >= count or time.monotonic() > deadline:
                return events
            await asyncio.sleep(0.05)

    async def verify(self, tenant: str) -> telemetry_pb2.VerifyAuditResponse:
        caller = common_pb2.Caller(subject="auditor", tenant=tenant)
        return await self.stub.VerifyAudit(
            telemetry_pb2.VerifyAuditRequest(caller=caller), wait_for_ready=True, timeout=10
        )


@pytest.fixture
async def telemetry(tmp_path: Path) -> AsyncIterator[Telemetry]:
    server = await Telemetry(tmp_path / "telemetry").start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def auth(tmp_path: Path, telemetry: Telemetry) -> AsyncIterator[AuthServer]:
    settings = make_settings(
        tmp_path / "auth",
        telemetry_target=telemetry.address,
        audit_backoff_base_s=0.05,
        audit_backoff_max_s=0.3,
    )
    server = await AuthServer(settings).start()
    try:
        yield server
    finally:
        await server.stop()


def outbox_rows(server: AuthServer) -> list[tuple[str, bytes]]:
    """What waits in auth's outbox table (the SQLite database of these tests)."""
    with sqlite3.connect(server.settings.data_dir / "auth.db") as conn:
        return conn.execute(
            "SELECT key, payload FROM auth_outbox WHERE kind = 'audit' ORDER BY id"
        ).fetchall()


def as_text(events: list[telemetry_pb2.AuditEvent]) -> str:
    return "\n".join(str(event) for event in events)


async def test_events_reach_the_trail_once_and_survive_a_telemetry_outage(
    auth: AuthServer, telemetry: Telemetry
) -> None:
    dev = auth.dev_credentials()
    admin_token = await auth.token()
    request_id = f"req-{uuid.uuid4().hex[:12]}"
    # The caller's span: the channel's client interceptor propagates it, as a mesh peer's would.
    with trace.get_tracer(__name__).start_as_current_span("caller") as caller:
        trace_id = format(caller.get_span_context().trace_id, "032x")
        created = await auth.stub.CreateClient(
            auth_pb2.CreateClientRequest(client_id="audit-bot", tenant="dev", roles=["reader"]),
            metadata=[*bearer(admin_token), ("x-request-id", request_id)],
        )
    secret = created.client_secret
    issued = await auth.stub.IssueToken(
        auth_pb2.IssueTokenRequest(client_id="audit-bot", client_secret=secret)
    )
    wrong = auth_pb2.IssueTokenRequest(client_id="audit-bot", client_secret=secret + "x")
    assert (await code_of(auth.stub.IssueToken(wrong)))[0] == grpc.StatusCode.UNAUTHENTICATED
    nobody = auth_pb2.IssueTokenRequest(client_id="no-such-client", client_secret="whatever-1")
    assert (await code_of(auth.stub.IssueToken(nobody)))[0] == grpc.StatusCode.UNAUTHENTICATED
    refused = auth.stub.ListClients(
        auth_pb2.ListClientsRequest(), metadata=bearer(issued.access_token)
    )
    assert (await code_of(refused))[0] == grpc.StatusCode.PERMISSION_DENIED

    events = await telemetry.wait_for("dev", 5)
    await asyncio.sleep(0.5)  # a late duplicate would show up by now
    events = await telemetry.events("dev")
    assert [(e.action, e.actor, e.target, e.outcome) for e in events] == [
        ("token.issue", "dev", "dev", "success"),
        ("admin.client.create", "dev", "audit-bot", "success"),
        ("token.issue", "audit-bot", "audit-bot", "success"),
        ("auth.failure", "audit-bot", "audit-bot", "denied"),
        ("permission.denied", "audit-bot", "", "denied"),
    ]
    assert len({e.event_id for e in events}) == len(events)
    policy = await auth.stub.GetPolicy(auth_pb2.GetPolicyRequest())
    for event in events:
        assert event.tenant == "dev"
        assert event.policy_version == policy.version
        assert list(event.contract_versions) == CONTRACTS
        assert event.occurred_at.ToNanoseconds() > 0
    create = events[1]
    assert create.request_id == request_id
    assert create.trace_id == trace_id
    assert json.loads(create.details_json) == {
        "client_tenant": "dev",
        "roles": ["reader"],
        "scopes": [],
    }
    issue = json.loads(events[2].details_json)
    assert issue["token_id"] == issued.token_id and issue["scopes"] == ["tools:read"]
    assert json.loads(events[3].details_json) == {
        "reason": "wrong secret",
        "rpc": "IssueToken",
        "source": "127.0.0.1",
    }
    assert json.loads(events[4].details_json)["attempted"] == "admin.client.list"

    unknown = await telemetry.wait_for("_unknown", 1)
    assert [(e.action, e.actor, e.outcome) for e in unknown] == [
        ("auth.failure", "no-such-client", "denied")
    ]
    assert json.loads(unknown[0].details_json)["reason"] == "unknown client"

    verdict = await telemetry.verify("dev")
    assert verdict.ok and verdict.events_checked == 5
    stored = as_text(events + unknown)
    for leaked in (secret, dev["client_secret"], admin_token, issued.access_token):
        assert leaked not in stored

    # Telemetry goes away: the admin change still succeeds, its event waits in the outbox.
    await telemetry.stop()
    disabled = await auth.stub.DisableClient(
        auth_pb2.DisableClientRequest(client_id="audit-bot"), metadata=bearer(admin_token)
    )
    assert disabled.client.state == auth_pb2.CLIENT_STATE_DISABLED
    waiting = outbox_rows(auth)
    assert len(waiting) == 1
    (key, payload) = waiting[0]
    pending = telemetry_pb2.AuditEvent.FromString(payload)
    assert (f"audit:{pending.event_id}", pending.action) == (key, "admin.client.disable")
    for leaked in (secret, dev["client_secret"], admin_token, issued.access_token):
        assert leaked.encode() not in payload
    await asyncio.sleep(0.5)  # a few delivery attempts fail meanwhile
    assert len(outbox_rows(auth)) == 1

    # Back on the same port and data dir: the event arrives, once, and the chain holds.
    await telemetry.start()
    events = await telemetry.wait_for("dev", 6)
    deadline = time.monotonic() + 5
    while outbox_rows(auth) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert outbox_rows(auth) == []
    await asyncio.sleep(0.3)
    events = await telemetry.events("dev")
    assert [(e.action, e.target, e.outcome) for e in events[5:]] == [
        ("admin.client.disable", "audit-bot", "success")
    ]
    assert f"audit:{events[5].event_id}" == key
    assert len(events) == 6
    verdict = await telemetry.verify("dev")
    assert verdict.ok and verdict.events_checked == 6


async def test_events_left_in_the_outbox_are_sent_by_the_next_start(
    tmp_path: Path, telemetry: Telemetry
) -> None:
    settings = make_settings(
        tmp_path / "auth",
        telemetry_target=telemetry.address,
        audit_backoff_base_s=0.05,
        audit_backoff_max_s=0.3,
    )
    await telemetry.stop()
    first = await AuthServer(settings).start()
    try:
        token = await first.token()
        await first.stub.RevokeToken(
            auth_pb2.RevokeTokenRequest(token_id="a" * 32), metadata=bearer(token)
        )
        # The first start's import of the policy file, the token, the revocation.
        assert len(outbox_rows(first)) == 3
    finally:
        await first.stop()

    await telemetry.start()
    second = await AuthServer(settings).start()
    try:
        events = await telemetry.wait_for("dev", 2)
        # Both arrive; their order is the order of delivery, which retries may change.
        assert sorted((e.action, e.target) for e in events) == [
            ("admin.token.revoke", "a" * 32),
            ("token.issue", "dev"),
        ]
        assert (await telemetry.verify("dev")).ok
        (seed,) = await telemetry.wait_for("_operator", 1)
        assert (seed.action, seed.policy_version) == ("admin.policy.seed", "1")
    finally:
        await second.stop()


async def test_verify_token_refusals_are_audited_without_the_token(
    auth: AuthServer, telemetry: Telemetry
) -> None:
    garbage = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJkZXYifQ."
    code, _ = await code_of(auth.stub.VerifyToken(auth_pb2.VerifyTokenRequest(token=garbage)))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    code, _ = await code_of(auth.stub.ListKeys(auth_pb2.ListKeysRequest()))
    assert code == grpc.StatusCode.UNAUTHENTICATED

    events = await telemetry.wait_for("_unknown", 2)
    assert [(e.action, e.actor, e.outcome) for e in events] == [
        ("auth.failure", "", "denied"),
        ("auth.failure", "", "denied"),
    ]
    assert json.loads(events[0].details_json) == {
        "reason": "algorithm not allowed",
        "rpc": "VerifyToken",
    }
    assert json.loads(events[1].details_json) == {
        "attempted": "admin.key.list",
        "reason": "missing bearer token",
    }
    assert garbage not in as_text(events)


async def test_an_event_telemetry_refuses_is_set_aside_and_the_queue_moves_on(
    tmp_path: Path, telemetry: Telemetry
) -> None:
    """A refused event does not block those queued with it: it becomes a dead letter and a
    notice takes its place in the tenant's chain, which VerifyAudit reports."""
    settings = make_settings(
        tmp_path / "auth",
        telemetry_target=telemetry.address,
        audit_backoff_base_s=0.05,
        audit_backoff_max_s=0.3,
    )
    await telemetry.stop()
    server = await AuthServer(settings).start()
    try:
        await server.token()  # its token.issue event waits in the outbox (with the seed's)
        waiting = len(outbox_rows(server))
        # An event telemetry refuses for good (an action outside the vocabulary), queued
        # behind it as another replica (or an older release) could have left it.
        bad = telemetry_pb2.AuditEvent(
            event_id=uuid.uuid4().hex, tenant="dev", actor="dev", action="audit.bogus"
        )
        bad.occurred_at.GetCurrentTime()
        other = TableOutbox(settings.resolved_database_url(), "auth")
        await other.open()
        try:
            await other.put([Item("audit", f"audit:{bad.event_id}", bad.SerializeToString())])
        finally:
            await other.close()
        assert len(outbox_rows(server)) == waiting + 1

        await telemetry.start()
        events = await telemetry.wait_for("dev", 2)
        assert [(e.action, e.target, e.outcome) for e in events] == [
            ("token.issue", "dev", "success"),
            ("audit.dead_letter", "audit.bogus", "failure"),
        ]
        notice = json.loads(events[1].details_json)
        assert notice["refused_event_id"] == bad.event_id
        assert notice["reason"].startswith("INVALID_ARGUMENT")
        deadline = time.monotonic() + 5
        while outbox_rows(server) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert outbox_rows(server) == []
        with sqlite3.connect(settings.data_dir / "auth.db") as conn:
            dead = conn.execute("SELECT key FROM auth_outbox_dead_letters").fetchall()
        assert dead == [(f"audit:{bad.event_id}",)]
        verdict = await telemetry.verify("dev")
        assert verdict.ok and verdict.dead_letter_notices == 1
    finally:
        await server.stop()
