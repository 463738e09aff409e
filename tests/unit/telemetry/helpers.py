"""Small builders shared by the ledger, audit and SLO tests."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2, status_pb2
from grpc import aio
from sqlalchemy import text

from services.kit.db import create_engine
from toolmesh.common.v1 import common_pb2

from .conftest import TelemetryServer


def caller(tenant: str = "acme", subject: str = "alice") -> common_pb2.Caller:
    return common_pb2.Caller(tenant=tenant, subject=subject)


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
