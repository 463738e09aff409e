"""Spans in SQL (SQLAlchemy 2 async): SQLite by default, PostgreSQL for several replicas.

Spans serve GetTrace only; statistics, SLOs and tool health come from the per-request records
(services.telemetry.records), so spans can be sampled. A span is stored ``kept`` when every
trace is kept, else pending until its trace's tail-sampling decision (services.telemetry.
sampling) keeps or deletes every pending span of the trace at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Float,
    Index,
    Integer,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    cast,
    delete,
    false,
    func,
    select,
    text,
    update,
)
from sqlalchemy.orm import Mapped, mapped_column

from services.kit.limits import MAX_KEY_CHARS
from services.telemetry.database import Base, Database
from services.telemetry.sampling import Decision, TraceFacts, decide

# Rows deleted per transaction by housekeeping; ingest waits at most for one chunk.
DELETE_CHUNK = 5000
# Traces decided per transaction by the sampler.
DECIDE_CHUNK = 500
PENDING = "NOT kept"


class SpanRow(Base):
    __tablename__ = "telemetry_spans"
    __table_args__ = (
        # An exporter retrying a batch must not count its spans twice.
        UniqueConstraint("trace_id", "span_id", name="uq_telemetry_spans_id"),
        Index("ix_telemetry_spans_end", "end_ns"),
        # The sampler's work list: only undecided spans, a few seconds' worth.
        Index(
            "ix_telemetry_spans_pending",
            "trace_id",
            "end_ns",
            sqlite_where=text(PENDING),
            postgresql_where=text(PENDING),
        ),
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
    # Certificate name of the peer that exported the span ("" without peer authentication).
    exporter: Mapped[str] = mapped_column(String(MAX_KEY_CHARS), nullable=False)
    # False while the trace's sampling decision is pending.
    kept: Mapped[bool] = mapped_column(Boolean, nullable=False)


@dataclass(frozen=True)
class SampledTraces:
    """What one sampler pass did."""

    kept: dict[str, int]  # traces kept, by reason
    dropped_traces: int
    dropped_spans: int


class SpanStore:
    def __init__(self, database: Database) -> None:
        self._db = database

    async def insert(self, records: list[dict[str, Any]], *, kept: bool) -> None:
        """Insert a batch in one transaction; spans already stored are skipped."""
        statement = self._db.insert(SpanRow).on_conflict_do_nothing(
            index_elements=["trace_id", "span_id"]
        )
        rows = [{**record, "kept": kept} for record in records]
        async with self._db.writing(), self._db.sessions() as session, session.begin():
            await session.execute(statement, rows)

    async def prune(self, ended_before_ns: int) -> int:
        """Delete spans that ended before the cut, in chunks so ingest never waits long."""
        return await self._db.delete_in_chunks(
            SpanRow, SpanRow.end_ns < ended_before_ns, DELETE_CHUNK
        )

    async def trace(self, trace_id: str) -> Sequence[SpanRow]:
        async with self._db.sessions() as session:
            return (
                await session.scalars(
                    select(SpanRow)
                    .where(SpanRow.trace_id == trace_id)
                    .order_by(SpanRow.start_ns, SpanRow.span_id)
                )
            ).all()

    async def decide_pending(
        self, *, ended_before_ns: int, ratio: float, slow_ms: float
    ) -> SampledTraces:
        """Keep or drop every pending trace whose newest pending span ended before the cut.

        One chunk of traces per transaction. A span that arrives for a trace while it is being
        decided has a higher id than the pass looked at and waits for the next pass; a span
        that arrives after its trace was kept is kept too (the trace has kept spans).
        """
        kept: dict[str, int] = {}
        dropped_traces = dropped_spans = 0
        while True:
            async with self._db.writing(), self._db.engine.begin() as conn:
                pending = (
                    await conn.execute(
                        select(
                            SpanRow.trace_id,
                            func.max(SpanRow.id),
                            func.max(cast(SpanRow.error, Integer)),
                            func.max(SpanRow.duration_ms),
                        )
                        # Verbatim the index's condition, so SQLite uses the partial index.
                        .where(text(PENDING))
                        .group_by(SpanRow.trace_id)
                        .having(func.max(SpanRow.end_ns) < ended_before_ns)
                        .limit(DECIDE_CHUNK)
                    )
                ).all()
                if not pending:
                    break
                ids = [row[0] for row in pending]
                already = set(
                    (
                        await conn.scalars(
                            select(SpanRow.trace_id)
                            .where(SpanRow.trace_id.in_(ids), SpanRow.kept)
                            .distinct()
                        )
                    ).all()
                )
                newest = max(int(row[1]) for row in pending)
                keep: list[str] = []
                drop: list[str] = []
                for trace_id, _, error, longest in pending:
                    facts = TraceFacts(trace_id, bool(error), float(longest), trace_id in already)
                    decision = decide(facts, ratio=ratio, slow_ms=slow_ms)
                    if decision is Decision.DROP:
                        drop.append(trace_id)
                    else:
                        keep.append(trace_id)
                        kept[decision.value] = kept.get(decision.value, 0) + 1
                undecided = (SpanRow.kept == false(), SpanRow.id <= newest)
                if keep:
                    await conn.execute(
                        update(SpanRow)
                        .where(SpanRow.trace_id.in_(keep), *undecided)
                        .values(kept=True)
                    )
                if drop:
                    result = await conn.execute(
                        delete(SpanRow).where(SpanRow.trace_id.in_(drop), *undecided)
                    )
                    dropped_spans += int(getattr(result, "rowcount", 0) or 0)
                    dropped_traces += len(drop)
            if len(pending) < DECIDE_CHUNK:
                break
        return SampledTraces(kept, dropped_traces, dropped_spans)
