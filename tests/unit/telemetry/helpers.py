"""Small builders shared by the ledger, audit and SLO tests."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2, status_pb2
from grpc import aio
from sqlalchemy import text

from services.kit.db import create_engine
from toolmesh.common.v1 import common_pb2
from toolmesh.telemetry.v1 import telemetry_pb2 as G

from .conftest import TelemetryServer


def caller(
    tenant: str = "acme", subject: str = "alice", scopes: tuple[str, ...] = ()
) -> common_pb2.Caller:
    return common_pb2.Caller(tenant=tenant, subject=subject, scopes=scopes)


# What the gateway passes for the platform operator (scope platform:admin).
OPERATOR = common_pb2.Caller(tenant="_platform", subject="root", scopes=["platform:admin"])
RUN = "/toolmesh.gateway.v1.Gateway/Run"
GATEWAY_SERVICE = "toolmesh-gateway"


def request_record(
    request_id: str,
    duration_ms: float,
    *,
    tenant: str = "acme",
    error: bool = False,
    tool: tuple[str, str] | None = None,
    tool_outcome: int = G.TOOL_OUTCOME_UNSPECIFIED,
    tool_ms: float = 0.0,
    ago_s: float = 1.0,
    route: str = RUN,
    service: str = GATEWAY_SERVICE,
    trace_id: str = "",
) -> G.UsageRecord:
    """One request as the gateway records it: what stats, SLOs and tool health read."""
    name, version = tool or ("", "")
    return G.UsageRecord(
        request_id=request_id,
        tenant=tenant,
        principal="alice",
        route=route,
        service=service,
        tool_name=name,
        tool_version=version,
        tool_calls=1 if tool else 0,
        occurred_at=stamp(datetime.now(UTC) - timedelta(seconds=ago_s)),
        outcome="error" if error else "ok",
        duration_ms=duration_ms,
        grpc_status_code=14 if error else 0,
        error=error,
        tool_outcome=tool_outcome,
        tool_duration_ms=tool_ms,
        trace_id=trace_id,
    )


async def record(server: TelemetryServer, *records: G.UsageRecord) -> None:
    """RecordUsage in batches of at most 1000, as the gateway's outbox sends them."""
    for start in range(0, len(records), 1000):
        await server.stub.RecordUsage(G.RecordUsageRequest(records=records[start : start + 1000]))


def stamp(moment: datetime | None = None) -> Timestamp:
    result = Timestamp()
    result.FromDatetime(moment or datetime.now(UTC))
    return result


def details(error: aio.AioRpcError, kind: type) -> list:
    raw = dict(error.trailing_metadata() or ())["grpc-status-details-bin"]
    found = []
    for detail in status_pb2.Status.FromString(raw).details:
        message = kind()
        if detail.Unpack(message):
            found.append(message)
    return found


def bad_fields(error: aio.AioRpcError) -> list[str]:
    return [
        v.field
        for bad in details(error, error_details_pb2.BadRequest)
        for v in bad.field_violations
    ]


async def sql(server: TelemetryServer, statement: str, **params: object) -> list:
    """Run SQL straight on the server's database, as an operator (or attacker) could."""
    engine = create_engine(server.settings.resolved_database_url())
    try:
        async with engine.begin() as conn:
            result = await conn.execute(text(statement), params)
            return list(result.all()) if result.returns_rows else []
    finally:
        await engine.dispose()
