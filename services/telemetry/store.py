"""Spans in SQL (SQLAlchemy 2 async): SQLite by default, PostgreSQL for several replicas."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Float,
    Index,
    Integer,
    Row,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    and_,
    case,
    delete,
    func,
    select,
)
from sqlalchemy.orm import Mapped, mapped_column

from services.telemetry.database import Base, Database
from services.telemetry.spans import MAX_KEY_CHARS, SPAN_KIND_SERVER

EXECUTE_TOOL = "execute_tool"
# Rows deleted per pruning transaction; ingest waits at most for one chunk.
PRUNE_CHUNK = 5000


class SpanRow(Base):
    __tablename__ = "telemetry_spans"
    __table_args__ = (
        # An exporter retrying a batch must not count its spans twice.
        UniqueConstraint("trace_id", "span_id", name="uq_telemetry_spans_id"),
        Index("ix_telemetry_spans_kind_end", "kind", "end_ns"),
        Index("ix_telemetry_spans_operation_end", "operation", "end_ns"),
        Index("ix_telemetry_spans_end", "end_ns"),
    )

    # SQLite only auto-increments INTEGER PRIMARY KEY.
    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    trace_id: Mapped[str] = mapped_column(String(32), nullable=False)
    span_id: Mapped[str] = mapped_column(String(16), nullable=False)
    parent_span_id: Mapped[str] = mapped_column(String(16), nullable=False)
    service: Mapped[str] = mapped_column(String(MAX_KEY_CHARS), nullable=False)
    name: Mapped[str] = mapped_column(String(MAX_KEY_CHARS), nullable=False)
    kind: Mapped[int] = mapped_column(SmallInteger, nullable=False)
    start_ns: Mapped[int] = mapped_column(BigInteger, nullable=False)
    end_ns: Mapped[int] = mapped_column(BigInteger, nullable=False)
    duration_ms: Mapped[float] = mapped_column(Float, nullable=False)
    error: Mapped[bool] = mapped_column(Boolean, nullable=False)
    route: Mapped[str] = mapped_column(String(MAX_KEY_CHARS), nullable=False)
    grpc_status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    tool_name: Mapped[str] = mapped_column(String(MAX_KEY_CHARS), nullable=False)
    tool_version: Mapped[str] = mapped_column(String(MAX_KEY_CHARS), nullable=False)
    tenant: Mapped[str] = mapped_column(String(MAX_KEY_CHARS), nullable=False)
    operation: Mapped[str] = mapped_column(String(MAX_KEY_CHARS), nullable=False)
    attributes_json: Mapped[str] = mapped_column(Text, nullable=False)


# What each GetStats grouping reads: its key columns and which spans count.
GROUPINGS: dict[str, tuple[tuple[Any, ...], Any]] = {
    "service": ((SpanRow.service,), SpanRow.kind == SPAN_KIND_SERVER),
    "route": ((SpanRow.service, SpanRow.route), SpanRow.kind == SPAN_KIND_SERVER),
    "tool": ((SpanRow.tool_name, SpanRow.tool_version), SpanRow.operation == EXECUTE_TOOL),
}


class SpanStore:
    def __init__(self, database: Database) -> None:
        self._db = database

    async def insert(self, records: list[dict[str, Any]]) -> None:
        """Insert a batch in one transaction; spans already stored are skipped."""
        statement = self._db.insert(SpanRow).on_conflict_do_nothing(
            index_elements=["trace_id", "span_id"]
        )
        async with self._db.writing(), self._db.sessions() as session, session.begin():
            await session.execute(statement, records)

    async def prune(self, ended_before_ns: int) -> int:
        """Delete spans that ended before the cut, in chunks so ingest never waits long."""
        total = 0
        while True:
            oldest = select(SpanRow.id).where(SpanRow.end_ns < ended_before_ns).limit(PRUNE_CHUNK)
            async with self._db.writing(), self._db.sessions() as session, session.begin():
                result = await session.execute(delete(SpanRow).where(SpanRow.id.in_(oldest)))
            deleted = int(getattr(result, "rowcount", 0) or 0)
            total += deleted
            if deleted < PRUNE_CHUNK:
                return total

    async def samples(
        self, grouping: str, window_start_ns: int, window_end_ns: int, service: str
    ) -> Sequence[Row[Any]]:
        """(key columns..., duration_ms, error) of every span the grouping counts in the window."""
        keys, which = GROUPINGS[grouping]
        query = select(*keys, SpanRow.duration_ms, SpanRow.error).where(
            which, SpanRow.end_ns >= window_start_ns, SpanRow.end_ns <= window_end_ns
        )
        if service:
            query = query.where(SpanRow.service == service)
        async with self._db.sessions() as session:
            return (await session.execute(query)).all()

    async def trace(self, trace_id: str) -> Sequence[SpanRow]:
        async with self._db.sessions() as session:
            return (
                await session.scalars(
                    select(SpanRow)
                    .where(SpanRow.trace_id == trace_id)
                    .order_by(SpanRow.start_ns, SpanRow.span_id)
                )
            ).all()

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
        """(spans, errors, slower than slow_ms) per window ending now, in one scan.

        SERVER spans of ``route``, or execute_tool spans of ``tool``, of one service.
        """
        which = (
            and_(SpanRow.kind == SPAN_KIND_SERVER, SpanRow.route == route)
            if route
            else and_(SpanRow.operation == EXECUTE_TOOL, SpanRow.tool_name == tool)
        )
        columns = []
        for window in windows_s:
            inside = SpanRow.end_ns >= now_ns - window * 1_000_000_000
            for bad in (None, SpanRow.error, SpanRow.duration_ms > slow_ms):
                condition = inside if bad is None else and_(inside, bad)
                columns.append(func.coalesce(func.sum(case((condition, 1), else_=0)), 0))
        query = select(*columns).where(
            which,
            SpanRow.service == service,
            SpanRow.end_ns >= now_ns - max(windows_s) * 1_000_000_000,
            SpanRow.end_ns <= now_ns,
        )
        async with self._db.sessions() as session:
            values = [int(v) for v in (await session.execute(query)).one()]
        return {
            window: (values[3 * i], values[3 * i + 1], values[3 * i + 2])
            for i, window in enumerate(windows_s)
        }
