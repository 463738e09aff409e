"""Statistics, SLO counts, tool health and trace ownership from the per-request records.

Each request the gateway serves leaves exactly one UsageRecord (de-duplicated by tenant and
request id), written only by the gateway through its durable outbox. Counting those instead of
spans keeps every figure exact whatever share of spans is sampled away, and keeps them out of
reach of any other mesh peer: span ingest is open to every process, RecordUsage to the gateway
alone. Records without ``duration_ms`` (from a sender that does not measure requests) count
for cost only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, and_, case, func, literal, select, true

from services.telemetry.database import Database
from services.telemetry.ledger import UsageRow
from toolmesh.telemetry.v1 import telemetry_pb2

NS_PER_S = 1_000_000_000
ANY_TOOL = "*"
_FAILED = telemetry_pb2.TOOL_OUTCOME_FAILED
_NO_TOOL = telemetry_pb2.TOOL_OUTCOME_UNSPECIFIED
_U = UsageRow

# Per grouping: its key columns, the duration and error columns it reads, which records count.
_MEASURED = _U.duration_ms.is_not(None)
_TOOL_RAN = _U.tool_outcome != _NO_TOOL
GROUPINGS: dict[str, tuple[tuple[Any, ...], Any, Any, ColumnElement[bool]]] = {
    "service": ((_U.service,), _U.duration_ms, _U.error, _MEASURED),
    "route": ((_U.service, _U.route), _U.duration_ms, _U.error, _MEASURED),
    "tool": (
        (_U.tool_name, _U.tool_version),
        _U.tool_duration_ms,
        _U.tool_outcome == _FAILED,
        _TOOL_RAN,
    ),
}


@dataclass(frozen=True)
class ToolCounts:
    tool_name: str
    tool_version: str
    calls: int
    failures: int


@dataclass(frozen=True)
class VersionSamples:
    """One release unit version's records in a window: every duration (for exact
    percentiles) and the counts the release analysis judges."""

    durations: list[float]
    errors: int
    slow: int
    no_match: int


def _version_filter(kind: str, name: str, version: str) -> tuple[ColumnElement[bool], Any, Any]:
    """Which records belong to a unit's version, and their duration and failure columns.

    A tool's version: its invocations (the tool's own latency and failures). A routing rules
    or prompt version: the requests it served (the request's latency, the mesh's faults).
    """
    if kind == "tool":
        which = and_(_TOOL_RAN, _U.tool_name == name, _U.tool_version == version)
        return which, _U.tool_duration_ms, _U.tool_outcome == _FAILED
    if kind == "routing":
        return and_(_MEASURED, _U.rules_version == version), _U.duration_ms, _U.error == true()
    # The prompts column is "name@version" comma-joined: match one whole element.
    named = (literal(",") + _U.prompts + literal(",")).contains(
        f",{name}@{version},", autoescape=True
    )
    return and_(_MEASURED, named), _U.duration_ms, _U.error == true()


class RequestRecords:
    def __init__(self, database: Database) -> None:
        self._db = database

    async def samples(
        self, grouping: str, tenant: str | None, start_ns: int, end_ns: int, service: str
    ) -> Sequence[Sequence[Any]]:
        """(key columns..., duration_ms, error) of every record the grouping counts."""
        keys, duration, error, which = GROUPINGS[grouping]
        query = select(*keys, duration, error).where(
            which, _U.occurred_at_ns >= start_ns, _U.occurred_at_ns <= end_ns
        )
        if tenant is not None:
            query = query.where(_U.tenant == tenant)
        if service:
            query = query.where(_U.service == service)
        async with self._db.engine.connect() as conn:
            return (await conn.execute(query)).all()

    async def window_counts(
        self,
        service: str,
        route: str,
        tool: str,
        *,
        slow_ms: float,
        windows_s: Sequence[int],
        now_ns: int,
    ) -> dict[int, tuple[int, int, int]]:
        """(events, errors, slower than slow_ms) per window ending now, in one scan.

        Requests of ``route``, or invocations of ``tool`` ("*": any tool), served by ``service``.
        """
        if route:
            which = and_(_MEASURED, _U.route == route)
            bad, duration = _U.error == true(), _U.duration_ms
        else:
            named = true() if tool == ANY_TOOL else _U.tool_name == tool
            which = and_(_TOOL_RAN, named)
            bad, duration = _U.tool_outcome == _FAILED, _U.tool_duration_ms
        columns = []
        for window in windows_s:
            inside = _U.occurred_at_ns >= now_ns - window * NS_PER_S
            for condition in (inside, and_(inside, bad), and_(inside, duration > slow_ms)):
                columns.append(func.coalesce(func.sum(case((condition, 1), else_=0)), 0))
        query = select(*columns).where(
            which,
            _U.service == service,
            _U.occurred_at_ns >= now_ns - max(windows_s) * NS_PER_S,
            _U.occurred_at_ns <= now_ns,
        )
        async with self._db.engine.connect() as conn:
            values = [int(v) for v in (await conn.execute(query)).one()]
        return {
            window: (values[3 * i], values[3 * i + 1], values[3 * i + 2])
            for i, window in enumerate(windows_s)
        }

    async def tool_health(self, start_ns: int, end_ns: int) -> list[ToolCounts]:
        """Invocations and failures per tool over every tenant's records in the window."""
        failed = func.coalesce(func.sum(case((_U.tool_outcome == _FAILED, 1), else_=0)), 0)
        query = (
            select(_U.tool_name, _U.tool_version, func.count(), failed)
            .where(
                _TOOL_RAN,
                _U.tool_name != "",
                _U.occurred_at_ns >= start_ns,
                _U.occurred_at_ns <= end_ns,
            )
            .group_by(_U.tool_name, _U.tool_version)
            .order_by(_U.tool_name, _U.tool_version)
        )
        async with self._db.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [
            ToolCounts(name, version, int(calls), int(bad)) for name, version, calls, bad in rows
        ]

    async def version_samples(
        self,
        kind: str,
        name: str,
        version: str,
        *,
        tenant: str,
        service: str,
        start_ns: int,
        end_ns: int,
        slow_ms: float,
    ) -> VersionSamples:
        """A release unit version's records in [start_ns, end_ns] (``tenant`` "": every
        tenant's; ``service`` "": every sender's)."""
        which, duration, failed = _version_filter(kind, name, version)
        query = select(duration, failed, _U.outcome).where(
            which, _U.occurred_at_ns >= start_ns, _U.occurred_at_ns <= end_ns
        )
        if tenant:
            query = query.where(_U.tenant == tenant)
        if service:
            query = query.where(_U.service == service)
        async with self._db.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        durations = sorted(float(d or 0.0) for d, _, _ in rows)
        return VersionSamples(
            durations=durations,
            errors=sum(1 for _, bad, _ in rows if bad),
            slow=sum(1 for d in durations if d > slow_ms),
            no_match=sum(1 for _, _, outcome in rows if outcome == "no_match"),
        )

    async def trace_tenants(self, trace_id: str) -> set[str]:
        """Tenants whose records name the trace (one, unless a trace id was reused)."""
        async with self._db.engine.connect() as conn:
            return set(
                (
                    await conn.scalars(select(_U.tenant).where(_U.trace_id == trace_id).distinct())
                ).all()
            )
