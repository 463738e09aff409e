"""The audit trail over gRPC: de-duplication, one chain under concurrency, tampering found."""

from __future__ import annotations

import asyncio
import hashlib
import json

import grpc
import pytest
from grpc import aio

from services.telemetry.audit import GENESIS, event_hash
from toolmesh.telemetry.v1 import telemetry_pb2 as G

from .conftest import TelemetryServer
from .helpers import bad_fields, caller, sql, stamp


def event(event_id: str, tenant: str = "acme", action: str = "tool.write") -> G.AuditEvent:
    return G.AuditEvent(
        event_id=event_id,
        occurred_at=stamp(),
        tenant=tenant,
        actor="alice",
        action=action,
        target="tool:calc@1.0.0",
        outcome="ok",
        request_id=f"req-{event_id}",
        trace_id="ab" * 16,
        policy_version="p7",
        contract_versions=["toolmesh.router.v1", "calc@1.0.0"],
        details_json='{"why": "test"}',
    )


async def append(server: TelemetryServer, *events: G.AuditEvent) -> G.AppendAuditResponse:
    return await server.stub.AppendAudit(G.AppendAuditRequest(events=events))


async def verify(server: TelemetryServer, tenant: str = "acme") -> G.VerifyAuditResponse:
    return await server.stub.VerifyAudit(G.VerifyAuditRequest(caller=caller(tenant)))


async def test_events_are_chained_once_and_listed(server: TelemetryServer) -> None:
    events = [event(f"e{i}", action="token.issue" if i % 2 else "tool.write") for i in range(1, 6)]
    first = await append(server, *events, event("g1", tenant="globex"))
    assert (first.stored, first.duplicates) == (6, 0)
    replay = await append(server, *events[:3], event("e3"))
    assert (replay.stored, replay.duplicates) == (0, 4)

    page = await server.stub.ListAudit(G.ListAuditRequest(caller=caller(), limit=2))
    assert [e.seq for e in page.events] == [1, 2]
    assert page.events[0].prev_hash == GENESIS
    assert page.events[1].prev_hash == page.events[0].hash
    stored = page.events[0].event
    assert (stored.event_id, stored.action, list(stored.contract_versions)) == (
        "e1",
        "token.issue",
        ["toolmesh.router.v1", "calc@1.0.0"],
    )
    assert json.loads(stored.details_json) == {"why": "test"}
    # The hash is reproducible from the documented canonical form alone.
    canonical = {
        "seq": 1,
        "prev_hash": GENESIS,
        "event_id": "e1",
        "occurred_at_ns": stored.occurred_at.ToNanoseconds(),
        "tenant": "acme",
        "actor": "alice",
        "action": "token.issue",
        "target": "tool:calc@1.0.0",
        "outcome": "ok",
        "request_id": "req-e1",
        "trace_id": "ab" * 16,
        "policy_version": "p7",
        "contract_versions": ["toolmesh.router.v1", "calc@1.0.0"],
        "details_json": '{"why": "test"}',
    }
    encoded = json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()
    assert page.events[0].hash == hashlib.sha256(encoded).hexdigest()
    rest = await server.stub.ListAudit(
        G.ListAuditRequest(caller=caller(), page_token=page.next_page_token)
    )
    assert [e.seq for e in rest.events] == [3, 4, 5]
    assert rest.next_page_token == ""
    issued = await server.stub.ListAudit(G.ListAuditRequest(caller=caller(), action="token.issue"))
    assert [e.event.event_id for e in issued.events] == ["e1", "e3", "e5"]
    future = stamp()
    future.seconds += 3600
    later = await server.stub.ListAudit(G.ListAuditRequest(caller=caller(), since=future))
    assert list(later.events) == []
    # Each tenant has its own chain and sees only it.
    globex = await server.stub.ListAudit(G.ListAuditRequest(caller=caller("globex")))
    assert [(e.seq, e.event.event_id) for e in globex.events] == [(1, "g1")]
    nobody = await server.stub.ListAudit(G.ListAuditRequest(caller=caller("nobody")))
    assert list(nobody.events) == []
    result = await verify(server)
    assert (result.ok, result.events_checked, result.head_seq) == (True, 5, 5)
    assert result.head_hash == rest.events[-1].hash
    assert (await verify(server, "nobody")).ok


async def test_concurrent_appends_make_one_valid_chain(
    server: TelemetryServer, replica: TelemetryServer
) -> None:
    stubs = [server, replica]
    results = await asyncio.gather(
        *(append(stubs[i % 2], event(f"c{i}"), event(f"c{i}")) for i in range(50))
    )
    assert sum(r.stored for r in results) == 50
    assert sum(r.duplicates for r in results) == 50
    result = await verify(server)
    assert (result.ok, result.events_checked, result.head_seq) == (True, 50, 50)


async def chain_of_five(server: TelemetryServer) -> list[G.StoredAuditEvent]:
    await append(server, *(event(f"e{i}") for i in range(1, 6)))
    await append(server, event("g1", tenant="globex"))
    return list((await server.stub.ListAudit(G.ListAuditRequest(caller=caller()))).events)


async def forge(server: TelemetryServer, event_id: str, seq: int, prev_hash: str) -> None:
    """Insert an event with a correct hash of its own, as someone with database access could."""
    fields = {
        "event_id": event_id,
        "occurred_at_ns": 1,
        "tenant": "acme",
        "actor": "mallory",
        "action": "admin.client.create",
        "target": "client:backdoor",
        "outcome": "ok",
        "request_id": "",
        "trace_id": "",
        "policy_version": "p7",
        "contract_versions": "[]",
        "details_json": "",
    }
    await sql(
        server,
        "INSERT INTO telemetry_audit (tenant, seq, event_id, occurred_at_ns, actor, action, "
        "target, outcome, request_id, trace_id, policy_version, contract_versions, details_json, "
        "prev_hash, hash) VALUES (:tenant, :seq, :event_id, :occurred_at_ns, :actor, :action, "
        ":target, :outcome, :request_id, :trace_id, :policy_version, :contract_versions, "
        ":details_json, :prev_hash, :hash)",
        seq=seq,
        prev_hash=prev_hash,
        hash=event_hash(seq, prev_hash, fields),
        **fields,
    )


ACME = "tenant = 'acme'"


@pytest.mark.parametrize(
    ("tamper", "kind", "seq", "event_id"),
    [
        ("edit", G.AUDIT_PROBLEM_KIND_EDITED, 3, "e3"),
        ("delete", G.AUDIT_PROBLEM_KIND_DELETED, 3, ""),
        ("delete-last", G.AUDIT_PROBLEM_KIND_DELETED, 5, ""),
        ("delete-renumber", G.AUDIT_PROBLEM_KIND_DELETED, 3, "e4"),
        ("insert-duplicate-seq", G.AUDIT_PROBLEM_KIND_INSERTED, 3, "forged"),
        ("insert-renumber", G.AUDIT_PROBLEM_KIND_INSERTED, 3, "forged"),
        ("insert-after-head", G.AUDIT_PROBLEM_KIND_INSERTED, 6, "forged"),
        ("swap", G.AUDIT_PROBLEM_KIND_REORDERED, 2, "e3"),
    ],
)
async def test_tampering_is_detected(
    server: TelemetryServer, tamper: str, kind: int, seq: int, event_id: str
) -> None:
    chain = await chain_of_five(server)
    hashes = {e.seq: e.hash for e in chain}
    if tamper == "edit":
        await sql(server, f"UPDATE telemetry_audit SET outcome = 'denied' WHERE {ACME} AND seq = 3")
    elif tamper == "delete":
        await sql(server, f"DELETE FROM telemetry_audit WHERE {ACME} AND seq = 3")
    elif tamper == "delete-last":
        await sql(server, f"DELETE FROM telemetry_audit WHERE {ACME} AND seq = 5")
    elif tamper == "delete-renumber":
        await sql(server, f"DELETE FROM telemetry_audit WHERE {ACME} AND seq = 3")
        await sql(server, f"UPDATE telemetry_audit SET seq = seq - 1 WHERE {ACME} AND seq > 3")
    elif tamper == "insert-duplicate-seq":
        await forge(server, "forged", 3, hashes[2])
    elif tamper == "insert-renumber":
        await sql(server, f"UPDATE telemetry_audit SET seq = seq + 1 WHERE {ACME} AND seq >= 3")
        await forge(server, "forged", 3, hashes[2])
    elif tamper == "insert-after-head":
        await forge(server, "forged", 6, hashes[5])
    else:
        await sql(
            server,
            f"UPDATE telemetry_audit SET seq = CASE seq WHEN 2 THEN 3 ELSE 2 END "
            f"WHERE {ACME} AND seq IN (2, 3)",
        )
    result = await verify(server)
    assert not result.ok
    problem = result.problem
    assert (problem.kind, problem.seq, problem.event_id) == (kind, seq, event_id), problem.message
    if tamper == "swap":
        assert "e2" in problem.message
    # The other tenant's chain is untouched and still verifies.
    assert (await verify(server, "globex")).ok


# Validation happens before any query: one backend is enough.
@pytest.mark.parametrize("settings", ["sqlite"], indirect=True)
@pytest.mark.parametrize(
    ("request_", "fields"),
    [
        (G.AppendAuditRequest(), ["events"]),
        (
            G.AppendAuditRequest(
                events=[G.AuditEvent(tenant="acme", details_json="[1]", contract_versions=[""])]
            ),
            [
                "events[0].event_id",
                "events[0].action",
                "events[0].occurred_at",
                "events[0].contract_versions",
                "events[0].details_json",
            ],
        ),
        (
            G.ListAuditRequest(caller=caller(), limit=1001, page_token="x"),
            ["limit", "page_token"],
        ),
        (G.VerifyAuditRequest(), ["caller.tenant"]),
    ],
)
async def test_validation(server: TelemetryServer, request_, fields: list[str]) -> None:
    call = type(request_).__name__.removesuffix("Request")
    with pytest.raises(aio.AioRpcError) as caught:
        await getattr(server.stub, call)(request_)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(caught.value) == fields
