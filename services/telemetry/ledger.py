"""Usage ledger and budgets: priced usage records, budget limits and reservations.

A reservation holds amounts against every budget that applies to its caller until RecordUsage
commits the actual usage (deleting the reservation in the same transaction) or it expires.
Checks and commits of one tenant are serialized on the tenant's row of telemetry_budget_locks,
so concurrent requests, here or in another replica, can never together pass a limit.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Float,
    Index,
    Integer,
    SmallInteger,
    String,
    UniqueConstraint,
    delete,
    func,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.orm import Mapped, mapped_column

from services.kit.limits import MAX_KEY_CHARS
from services.kit.pricing import PriceTable, cost_micros
from services.telemetry.database import Base, Database

PERIODS = ("day", "month")
# Rows deleted per transaction by retention.
DELETE_CHUNK = 5000
METRICS = ("tool_calls", "tokens", "cost_micros")
COST_KEYS = ("tenant", "principal", "tool_name", "day", "model")


class UsageRow(Base):
    __tablename__ = "telemetry_usage"
    __table_args__ = (
        # A replayed record (outbox redelivery) is stored once.
        UniqueConstraint("tenant", "request_id", name="uq_telemetry_usage_request"),
        Index("ix_telemetry_usage_tenant_occurred", "tenant", "occurred_at_ns"),
        # Mesh-wide windows (tool health, SLOs, the operator's stats) and retention.
        Index("ix_telemetry_usage_occurred", "occurred_at_ns"),
        # GetTrace: which tenant a trace is (only records that name one).
        Index("ix_telemetry_usage_trace", "trace_id"),
    )

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    tenant: Mapped[str] = mapped_column(String(MAX_KEY_CHARS), nullable=False)
    request_id: Mapped[str] = mapped_column(String(MAX_KEY_CHARS), nullable=False)
    principal: Mapped[str] = mapped_column(String(MAX_KEY_CHARS), nullable=False)
    route: Mapped[str] = mapped_column(String(MAX_KEY_CHARS), nullable=False)
    tool_name: Mapped[str] = mapped_column(String(MAX_KEY_CHARS), nullable=False)
    tool_version: Mapped[str] = mapped_column(String(MAX_KEY_CHARS), nullable=False)
    tokens_in: Mapped[int] = mapped_column(BigInteger, nullable=False)
    tokens_out: Mapped[int] = mapped_column(BigInteger, nullable=False)
    tool_calls: Mapped[int] = mapped_column(BigInteger, nullable=False)
    cost_units: Mapped[int] = mapped_column(BigInteger, nullable=False)
    cost_micros: Mapped[int] = mapped_column(BigInteger, nullable=False)
    currency: Mapped[str] = mapped_column(String(3), nullable=False)
    price_version: Mapped[str] = mapped_column(String(MAX_KEY_CHARS), nullable=False)
    occurred_at_ns: Mapped[int] = mapped_column(BigInteger, nullable=False)
    # UTC date of occurred_at, "YYYY-MM-DD": GetCost groups by it the same way on both backends.
    day: Mapped[str] = mapped_column(String(10), nullable=False)
    outcome: Mapped[str] = mapped_column(String(MAX_KEY_CHARS), nullable=False)
    reservation_id: Mapped[str] = mapped_column(String(32), nullable=False)
    # What statistics, SLOs and tool health read (records without duration_ms count only
    # for cost: they come from a sender that does not measure requests).
    service: Mapped[str] = mapped_column(String(MAX_KEY_CHARS), nullable=False)
    duration_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    grpc_status_code: Mapped[int] = mapped_column(SmallInteger, nullable=False)
    error: Mapped[bool] = mapped_column(Boolean, nullable=False)
    tool_outcome: Mapped[int] = mapped_column(SmallInteger, nullable=False)
    tool_duration_ms: Mapped[float] = mapped_column(Float, nullable=False)
    trace_id: Mapped[str] = mapped_column(String(32), nullable=False)
    # The model whose tokens these are ("" when none was consulted), and the prompt template
    # versions used ("name@version", comma-separated).
    model: Mapped[str] = mapped_column(String(MAX_KEY_CHARS), nullable=False, server_default="")
    prompts: Mapped[str] = mapped_column(String(512), nullable=False, server_default="")
    # The routing rules version that routed the request ("" when none did, or unknown).
    rules_version: Mapped[str] = mapped_column(
        String(MAX_KEY_CHARS), nullable=False, server_default=""
    )


class UsageTotalRow(Base):
    """Running usage per tenant (principal "") or principal, per day and month.

    Kept up to date by RecordUsage in the usage's own transaction, so a budget check reads one
    row instead of summing a month of usage while every other check of the tenant waits.
    """

    __tablename__ = "telemetry_usage_totals"

    tenant: Mapped[str] = mapped_column(String(MAX_KEY_CHARS), primary_key=True)
    principal: Mapped[str] = mapped_column(String(MAX_KEY_CHARS), primary_key=True)
    period: Mapped[str] = mapped_column(String(8), primary_key=True)
    period_start_ns: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    tool_calls: Mapped[int] = mapped_column(BigInteger, nullable=False)
    tokens: Mapped[int] = mapped_column(BigInteger, nullable=False)
    cost_micros: Mapped[int] = mapped_column(BigInteger, nullable=False)


class BudgetRow(Base):
    __tablename__ = "telemetry_budgets"
    __table_args__ = (
        UniqueConstraint("tenant", "principal", "period", name="uq_telemetry_budgets_scope"),
    )

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    tenant: Mapped[str] = mapped_column(String(MAX_KEY_CHARS), nullable=False)
    # Empty: the whole tenant.
    principal: Mapped[str] = mapped_column(String(MAX_KEY_CHARS), nullable=False)
    period: Mapped[str] = mapped_column(String(8), nullable=False)
    # 0: no limit on that metric.
    limit_tool_calls: Mapped[int] = mapped_column(BigInteger, nullable=False)
    limit_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False)
    limit_cost_micros: Mapped[int] = mapped_column(BigInteger, nullable=False)
    updated_at_ns: Mapped[int] = mapped_column(BigInteger, nullable=False)


class ReservationRow(Base):
    __tablename__ = "telemetry_reservations"
    __table_args__ = (
        UniqueConstraint("tenant", "request_id", name="uq_telemetry_reservations_request"),
        Index("ix_telemetry_reservations_expires", "expires_at_ns"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(MAX_KEY_CHARS), nullable=False)
    principal: Mapped[str] = mapped_column(String(MAX_KEY_CHARS), nullable=False)
    request_id: Mapped[str] = mapped_column(String(MAX_KEY_CHARS), nullable=False)
    tool_calls: Mapped[int] = mapped_column(BigInteger, nullable=False)
    tokens: Mapped[int] = mapped_column(BigInteger, nullable=False)
    cost_micros: Mapped[int] = mapped_column(BigInteger, nullable=False)
    created_at_ns: Mapped[int] = mapped_column(BigInteger, nullable=False)
    expires_at_ns: Mapped[int] = mapped_column(BigInteger, nullable=False)


class BudgetLockRow(Base):
    """One row per tenant, locked FOR UPDATE by every budget check and usage commit."""

    __tablename__ = "telemetry_budget_locks"

    tenant: Mapped[str] = mapped_column(String(MAX_KEY_CHARS), primary_key=True)


@dataclass(frozen=True)
class Amounts:
    tool_calls: int = 0
    tokens: int = 0
    cost_micros: int = 0

    def get(self, metric: str) -> int:
        return int(getattr(self, metric))


def period_bounds(period: str, now: datetime) -> tuple[datetime, datetime]:
    """Start of the current period and when the next one starts (the reset), in UTC."""
    day = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        return day, day + timedelta(days=1)
    start = day.replace(day=1)
    following = start.replace(year=start.year + start.month // 12, month=start.month % 12 + 1)
    return start, following


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _ns(moment: datetime) -> int:
    """Exact nanoseconds since the epoch (float timestamps can be off by a microsecond)."""
    return (moment - _EPOCH) // timedelta(microseconds=1) * 1000


@dataclass(frozen=True)
class BudgetState:
    budget: Any  # a row of telemetry_budgets
    used: Amounts
    reserved: Amounts
    period_start: datetime
    resets_at: datetime

    @property
    def limits(self) -> Amounts:
        b = self.budget
        return Amounts(b.limit_tool_calls, b.limit_tokens, b.limit_cost_micros)

    @property
    def remaining(self) -> Amounts:
        """limit - used - reserved (at least 0), -1 for a metric without a limit."""
        values = []
        for metric in METRICS:
            limit = self.limits.get(metric)
            spent = self.used.get(metric) + self.reserved.get(metric)
            values.append(max(0, limit - spent) if limit else -1)
        return Amounts(*values)

    @property
    def scope(self) -> str:
        b = self.budget
        return (
            f"principal {b.principal} of tenant {b.tenant}" if b.principal else f"tenant {b.tenant}"
        )


@dataclass(frozen=True)
class Violation:
    state: BudgetState
    metric: str
    asked: int

    @property
    def subject(self) -> str:
        b = self.state.budget
        return f"tenant:{b.tenant}" + (f"/principal:{b.principal}" if b.principal else "")

    @property
    def description(self) -> str:
        s = self.state
        return (
            f"{s.scope}: {s.budget.period} {self.metric} limit {s.limits.get(self.metric)} "
            f"(used {s.used.get(self.metric)}, reserved {s.reserved.get(self.metric)}, "
            f"asked {self.asked}); resets at {iso(s.resets_at)}"
        )


@dataclass(frozen=True)
class Reservation:
    id: str
    expires_at_ns: int


def _used(tenant: str, principal: str, period: str, start_ns: int) -> Any:
    t = UsageTotalRow
    return select(t.tool_calls, t.tokens, t.cost_micros).where(
        t.tenant == tenant,
        t.principal == principal,
        t.period == period,
        t.period_start_ns == start_ns,
    )


def _reserved_sums(tenant: str, principal: str, now_ns: int) -> Any:
    r = ReservationRow
    query = select(
        func.coalesce(func.sum(r.tool_calls), 0),
        func.coalesce(func.sum(r.tokens), 0),
        func.coalesce(func.sum(r.cost_micros), 0),
    ).where(r.tenant == tenant, r.expires_at_ns > now_ns)
    return query.where(r.principal == principal) if principal else query


def _applying(tenant: str, principal: str) -> Any:
    """Budgets that bind ``principal``: the tenant-wide ones and its own."""
    return (
        select(BudgetRow)
        .where(BudgetRow.tenant == tenant, BudgetRow.principal.in_(["", principal]))
        .order_by(BudgetRow.principal, BudgetRow.period)
    )


class Ledger:
    def __init__(self, database: Database, prices: PriceTable) -> None:
        self._db = database
        self.prices = prices

    async def record(self, records: Sequence[dict[str, Any]]) -> tuple[int, int]:
        """Price and store records, committing their reservations; (stored, duplicates).

        One transaction per tenant under its budget lock: a budget check never sees a
        reservation gone while its usage is not yet visible.
        """
        stored = 0
        by_tenant: dict[str, list[dict[str, Any]]] = {}
        for record in records:
            by_tenant.setdefault(record["tenant"], []).append(record)
        for tenant in sorted(by_tenant):
            async with self._db.locked(BudgetLockRow, tenant) as (conn, _):
                stored_now = [
                    priced
                    for record in by_tenant[tenant]
                    if (priced := await self._record_one(conn, record)) is not None
                ]
                await self._add_to_totals(conn, tenant, stored_now)
                committed = [r["reservation_id"] for r in stored_now if r["reservation_id"]]
                if committed:
                    await conn.execute(
                        delete(ReservationRow).where(
                            ReservationRow.tenant == tenant, ReservationRow.id.in_(committed)
                        )
                    )
                stored += len(stored_now)
        return stored, len(records) - stored

    async def _record_one(
        self, conn: AsyncConnection, record: dict[str, Any]
    ) -> dict[str, Any] | None:
        """Store one priced record; the priced record, or None for a replay already stored."""
        priced = {
            **record,
            "cost_micros": cost_micros(
                self.prices,
                record["tokens_in"],
                record["tokens_out"],
                record["tool_calls"],
                record["cost_units"],
                model=record["model"],
            ),
            "currency": self.prices.currency,
            "price_version": self.prices.version,
            "day": (_EPOCH + timedelta(seconds=record["occurred_at_ns"] // 1_000_000_000)).strftime(
                "%Y-%m-%d"
            ),
        }
        inserted = await conn.execute(
            self._db.insert(UsageRow)
            .values(**priced)
            .on_conflict_do_nothing(index_elements=["tenant", "request_id"])
            .returning(UsageRow.id)
        )
        return priced if inserted.first() is not None else None

    async def _add_to_totals(
        self, conn: AsyncConnection, tenant: str, records: Sequence[dict[str, Any]]
    ) -> None:
        """Add stored records to the running totals: one upsert per (principal, period,
        period start) however many records of a delivered batch fall in it."""
        sums: dict[tuple[str, str, int], list[int]] = {}
        for record in records:
            occurred = _EPOCH + timedelta(microseconds=record["occurred_at_ns"] // 1000)
            amounts = (
                record["tool_calls"],
                record["tokens_in"] + record["tokens_out"],
                record["cost_micros"],
            )
            for principal in {"", record["principal"]}:
                for period in PERIODS:
                    start, _ = period_bounds(period, occurred)
                    total = sums.setdefault((principal, period, _ns(start)), [0, 0, 0])
                    for i, amount in enumerate(amounts):
                        total[i] += amount
        t = UsageTotalRow
        for (principal, period, start_ns), (tool_calls, tokens, cost) in sums.items():
            statement = self._db.insert(t).values(
                tenant=tenant,
                principal=principal,
                period=period,
                period_start_ns=start_ns,
                tool_calls=tool_calls,
                tokens=tokens,
                cost_micros=cost,
            )
            await conn.execute(
                statement.on_conflict_do_update(
                    index_elements=["tenant", "principal", "period", "period_start_ns"],
                    set_={
                        name: getattr(t, name) + getattr(statement.excluded, name)
                        for name in METRICS
                    },
                )
            )

    async def cost(
        self, tenant: str, keys: Sequence[str], start_ns: int, end_ns: int
    ) -> list[dict[str, Any]]:
        """Sums of the tenant's usage in [start, end), one dict per group of ``keys``."""
        u = UsageRow
        columns = [getattr(u, key) for key in keys]
        query = (
            select(
                *columns,
                u.currency,
                func.count(),
                func.sum(u.tokens_in),
                func.sum(u.tokens_out),
                func.sum(u.tool_calls),
                func.sum(u.cost_units),
                func.sum(u.cost_micros),
            )
            .where(u.tenant == tenant, u.occurred_at_ns >= start_ns, u.occurred_at_ns < end_ns)
            .group_by(*columns, u.currency)
            .order_by(*columns, u.currency)
        )
        names = [*keys, "currency", "requests", "tokens_in", "tokens_out", "tool_calls"]
        names += ["cost_units", "cost_micros"]
        async with self._db.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        # PostgreSQL sums BIGINT as NUMERIC (Decimal): back to int.
        width = len(keys) + 1
        return [
            dict(zip(names, [*row[:width], *map(int, row[width:])], strict=True)) for row in rows
        ]

    async def set_budget(
        self, tenant: str, principal: str, period: str, limits: Amounts, now: datetime
    ) -> BudgetState | None:
        """Create or replace a budget; all limits 0 removes it (None)."""
        async with self._db.locked(BudgetLockRow, tenant) as (conn, _):
            where = (
                BudgetRow.tenant == tenant,
                BudgetRow.principal == principal,
                BudgetRow.period == period,
            )
            await conn.execute(delete(BudgetRow).where(*where))
            if limits == Amounts():
                return None
            await conn.execute(
                self._db.insert(BudgetRow).values(
                    tenant=tenant,
                    principal=principal,
                    period=period,
                    limit_tool_calls=limits.tool_calls,
                    limit_tokens=limits.tokens,
                    limit_cost_micros=limits.cost_micros,
                    updated_at_ns=_ns(now),
                )
            )
            budget = (await conn.execute(select(BudgetRow).where(*where))).one()
            return await self._state(conn, budget, now)

    async def budgets(self, tenant: str, now: datetime) -> list[BudgetState]:
        async with self._db.engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(BudgetRow)
                    .where(BudgetRow.tenant == tenant)
                    .order_by(BudgetRow.principal, BudgetRow.period)
                )
            ).all()
            return [await self._state(conn, row, now) for row in rows]

    async def budgeted(self, tenant: str, principal: str) -> bool:
        async with self._db.engine.connect() as conn:
            return (await conn.execute(_applying(tenant, principal).limit(1))).first() is not None

    async def _state(self, conn: AsyncConnection, budget: Any, now: datetime) -> BudgetState:
        start, reset = period_bounds(budget.period, now)
        used = (
            await conn.execute(_used(budget.tenant, budget.principal, budget.period, _ns(start)))
        ).first() or (0, 0, 0)
        reserved = (
            await conn.execute(_reserved_sums(budget.tenant, budget.principal, _ns(now)))
        ).one()
        return BudgetState(
            budget, Amounts(*map(int, used)), Amounts(*map(int, reserved)), start, reset
        )

    async def reserve(
        self,
        tenant: str,
        principal: str,
        request_id: str,
        *,
        asked: Amounts,
        ttl_s: int,
        now: datetime,
        top_up: bool = False,
    ) -> Reservation | list[Violation] | None:
        """A reservation, the violated budgets, or None when no budget applies.

        With ``top_up`` a live reservation of the request is raised to ``asked`` (each metric
        to the larger of held and asked); only the increase is checked against the budgets.
        """
        if not await self.budgeted(tenant, principal):
            return None
        now_ns = _ns(now)
        async with self._db.locked(BudgetLockRow, tenant) as (conn, _):
            r = ReservationRow
            existing = (
                await conn.execute(
                    select(r.id, r.expires_at_ns, r.tool_calls, r.tokens, r.cost_micros).where(
                        r.tenant == tenant, r.request_id == request_id
                    )
                )
            ).first()
            if existing is not None and existing.expires_at_ns > now_ns:
                if top_up:
                    return await self._raise(
                        conn, existing, asked, tenant=tenant, principal=principal, now=now
                    )
                return Reservation(existing.id, existing.expires_at_ns)
            if existing is not None:
                await conn.execute(delete(r).where(r.id == existing.id))
            # A retry after the usage was committed must not hold the amounts a second time.
            committed = (
                await conn.execute(
                    select(UsageRow.reservation_id).where(
                        UsageRow.tenant == tenant,
                        UsageRow.request_id == request_id,
                        UsageRow.reservation_id != "",
                    )
                )
            ).first()
            if committed is not None:
                return Reservation(committed.reservation_id, now_ns)
            budgets = (await conn.execute(_applying(tenant, principal))).all()
            violations = [
                violation
                for budget in budgets
                for violation in _violations(await self._state(conn, budget, now), asked)
            ]
            if violations:
                return violations
            reservation = Reservation(uuid.uuid4().hex, now_ns + ttl_s * 1_000_000_000)
            await conn.execute(
                self._db.insert(r).values(
                    id=reservation.id,
                    tenant=tenant,
                    principal=principal,
                    request_id=request_id,
                    tool_calls=asked.tool_calls,
                    tokens=asked.tokens,
                    cost_micros=asked.cost_micros,
                    created_at_ns=now_ns,
                    expires_at_ns=reservation.expires_at_ns,
                )
            )
            return reservation

    async def _raise(
        self,
        conn: AsyncConnection,
        held: Any,
        asked: Amounts,
        *,
        tenant: str,
        principal: str,
        now: datetime,
    ) -> Reservation | list[Violation]:
        """Raise a live reservation (a row of telemetry_reservations) to ``asked``; the caller
        holds the tenant's budget lock."""
        target = Amounts(*(max(getattr(held, metric), asked.get(metric)) for metric in METRICS))
        increase = Amounts(*(target.get(m) - getattr(held, m) for m in METRICS))
        if increase != Amounts():
            budgets = (await conn.execute(_applying(tenant, principal))).all()
            violations = [
                violation
                for budget in budgets
                for violation in _violations(await self._state(conn, budget, now), increase)
            ]
            if violations:
                return violations
            await conn.execute(
                update(ReservationRow)
                .where(ReservationRow.id == held.id)
                .values(
                    tool_calls=target.tool_calls,
                    tokens=target.tokens,
                    cost_micros=target.cost_micros,
                )
            )
        return Reservation(held.id, held.expires_at_ns)

    async def prune(self, occurred_before_ns: int) -> int:
        """Delete usage records that occurred before the cut, a chunk per transaction."""
        return await self._db.delete_in_chunks(
            UsageRow, UsageRow.occurred_at_ns < occurred_before_ns, DELETE_CHUNK
        )

    async def prune_totals(self, started_before_ns: int) -> int:
        """Delete running totals of periods that started before the cut, one period start per
        transaction. Budgets read only the current day's and month's totals."""
        t = UsageTotalRow
        async with self._db.engine.connect() as conn:
            starts = (
                await conn.scalars(
                    select(t.period_start_ns)
                    .where(t.period_start_ns < started_before_ns)
                    .distinct()
                )
            ).all()
        deleted = 0
        for start in starts:
            async with self._db.writing(), self._db.engine.begin() as conn:
                result = await conn.execute(delete(t).where(t.period_start_ns == start))
            deleted += int(getattr(result, "rowcount", 0) or 0)
        return deleted

    async def delete_expired(self, now_ns: int) -> int:
        """Expired reservations no longer count; this only keeps the table small."""
        async with self._db.writing(), self._db.engine.begin() as conn:
            result = await conn.execute(
                delete(ReservationRow).where(ReservationRow.expires_at_ns <= now_ns)
            )
        return int(getattr(result, "rowcount", 0) or 0)


def _violations(state: BudgetState, asked: Amounts) -> Iterable[Violation]:
    for metric in METRICS:
        limit = state.limits.get(metric)
        total = state.used.get(metric) + state.reserved.get(metric) + asked.get(metric)
        if limit and total > limit:
            yield Violation(state, metric, asked.get(metric))
