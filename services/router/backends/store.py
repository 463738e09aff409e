"""Backends and tool versions in the router's database (SQLite or PostgreSQL), shared by every
replica.

``router_backends`` holds registrations (unique per tenant and name; "" is the shared tenant).
``router_tool_versions`` holds every contract discovery found: PUBLISHED (servable; the release
state picks the stable one, services.router.releases), PENDING (a
drift, waiting for approval, version "") and RETIRED (replaced). Two partial unique indexes make
concurrent discoveries by several replicas safe: one row per published version, one pending row
per fingerprint. Removing a backend removes its versions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    delete,
    func,
    select,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlalchemy.orm import Mapped, mapped_column

from services.router.backends.config import BackendConfig, BackendRecord
from services.router.backends.contracts import FIRST_VERSION, DiscoveredTool, release_key
from services.router.notes import Base

__all__ = ["BackendStore", "Base", "Drift", "NameTaken", "VersionRecord", "VersionState"]

# PostgreSQL advisory lock taken by registrations, so that a shared name and a tenant's name
# cannot be claimed at once by two replicas.
_REGISTER_LOCK = 0x746F6F6C626B


class VersionState(StrEnum):
    PUBLISHED = "published"
    PENDING = "pending"
    RETIRED = "retired"


class BackendRow(Base):
    __tablename__ = "router_backends"
    __table_args__ = (UniqueConstraint("tenant", "name", name="uq_router_backends_tenant_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant: Mapped[str] = mapped_column(String(128))
    name: Mapped[str] = mapped_column(String(32))
    kind: Mapped[str] = mapped_column(String(16))
    config_json: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    created_by: Mapped[str] = mapped_column(String(256))


class ToolVersionRow(Base):
    __tablename__ = "router_tool_versions"
    __table_args__ = (
        Index(
            "uq_router_tool_versions_version",
            "backend_id",
            "tool",
            "version",
            unique=True,
            sqlite_where=text("state != 'pending'"),
            postgresql_where=text("state != 'pending'"),
        ),
        Index(
            "uq_router_tool_versions_pending",
            "backend_id",
            "tool",
            "fingerprint",
            unique=True,
            sqlite_where=text("state = 'pending'"),
            postgresql_where=text("state = 'pending'"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    backend_id: Mapped[int] = mapped_column(
        Integer, ForeignKey("router_backends.id", ondelete="CASCADE")
    )
    tool: Mapped[str] = mapped_column(String(64))
    version: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16))
    fingerprint: Mapped[str] = mapped_column(String(64))
    contract_json: Mapped[str] = mapped_column(Text)
    discovered_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    decided_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    decided_by: Mapped[str] = mapped_column(String(256))


def _utc(value: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes; they were written in UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


@dataclass(frozen=True)
class VersionRecord:
    id: int
    backend_id: int
    tool: str
    version: str
    state: VersionState
    fingerprint: str
    contract: DiscoveredTool
    discovered_at: datetime
    decided_at: datetime | None
    decided_by: str

    @classmethod
    def from_row(cls, row: ToolVersionRow) -> VersionRecord:
        discovered = _utc(row.discovered_at)
        assert discovered is not None
        return cls(
            id=row.id,
            backend_id=row.backend_id,
            tool=row.tool,
            version=row.version,
            state=VersionState(row.state),
            fingerprint=row.fingerprint,
            contract=DiscoveredTool.from_json(row.contract_json),
            discovered_at=discovered,
            decided_at=_utc(row.decided_at),
            decided_by=row.decided_by,
        )


@dataclass(frozen=True)
class Drift:
    """A contract discovery found under a published tool, recorded as PENDING by this call."""

    backend_id: int
    tool: str
    published: VersionRecord
    pending: VersionRecord


class NameTaken(Exception):
    """The name is taken by the tenant's own backend or a shared one."""


class ApprovalRefused(Exception):
    """No pending contract with that fingerprint, or the version breaks the rules."""

    def __init__(self, message: str, *, not_found: bool = False) -> None:
        super().__init__(message)
        self.not_found = not_found


def _record(row: BackendRow) -> BackendRecord:
    created = _utc(row.created_at)
    assert created is not None
    return BackendRecord(
        id=row.id,
        tenant=row.tenant,
        config=BackendConfig.from_json(row.name, row.config_json),
        created_at=created,
        created_by=row.created_by,
    )


class BackendStore:
    def __init__(self, sessions: async_sessionmaker[Any]) -> None:
        self._sessions = sessions

    async def create(
        self, config: BackendConfig, *, tenant: str, created_by: str, now: datetime
    ) -> BackendRecord:
        """Store a registration; NameTaken when the name clashes with a visible backend."""
        row = BackendRow(
            tenant=tenant,
            name=config.name,
            kind=config.kind.value,
            config_json=config.to_json(),
            created_at=now,
            created_by=created_by,
        )
        try:
            async with self._sessions() as session, session.begin():
                if session.bind.dialect.name == "postgresql":
                    await session.execute(
                        text("SELECT pg_advisory_xact_lock(:key)"), {"key": _REGISTER_LOCK}
                    )
                # A tenant's name may not shadow a shared one; a shared name may not take one
                # a tenant already uses (every tenant sees shared backends).
                clash = select(BackendRow.id).where(BackendRow.name == config.name)
                if tenant:
                    clash = clash.where(BackendRow.tenant.in_([tenant, ""]))
                if await session.scalar(clash.limit(1)) is not None:
                    raise NameTaken(config.name)
                session.add(row)
        except IntegrityError:
            raise NameTaken(config.name) from None
        return _record(row)

    async def load(self) -> tuple[list[BackendRecord], list[VersionRecord]]:
        """Every registration and every version (the table is small: one row per tool)."""
        async with self._sessions() as session:
            backends = (await session.scalars(select(BackendRow).order_by(BackendRow.id))).all()
            versions = (
                await session.scalars(select(ToolVersionRow).order_by(ToolVersionRow.id))
            ).all()
        return [_record(b) for b in backends], [VersionRecord.from_row(v) for v in versions]

    async def remove(self, backend_id: int) -> bool:
        async with self._sessions() as session, session.begin():
            await session.execute(
                delete(ToolVersionRow).where(ToolVersionRow.backend_id == backend_id)
            )
            result = await session.execute(delete(BackendRow).where(BackendRow.id == backend_id))
        return bool(getattr(result, "rowcount", 0))

    async def versions_of(self, backend_id: int) -> list[VersionRecord]:
        async with self._sessions() as session:
            rows = await session.scalars(
                select(ToolVersionRow)
                .where(ToolVersionRow.backend_id == backend_id)
                .order_by(ToolVersionRow.id)
            )
            return [VersionRecord.from_row(r) for r in rows.all()]

    async def versions(self, backend_id: int, tool: str) -> list[VersionRecord]:
        async with self._sessions() as session:
            rows = await session.scalars(
                select(ToolVersionRow)
                .where(ToolVersionRow.backend_id == backend_id, ToolVersionRow.tool == tool)
                .order_by(ToolVersionRow.id)
            )
            return [VersionRecord.from_row(r) for r in rows.all()]

    async def record_discovery(
        self, backend_id: int, tools: Sequence[DiscoveredTool], now: datetime
    ) -> list[Drift]:
        """Publish tools seen for the first time as 1.0.0; record each other contract that
        differs from the published one as PENDING. Returns the drifts this call recorded
        (another replica may have recorded the same one first: then it is not returned)."""
        drifts: list[Drift] = []
        for tool in tools:
            drift = await self._record_one(backend_id, tool, now)
            if drift is not None:
                drifts.append(drift)
        return drifts

    async def _record_one(
        self, backend_id: int, tool: DiscoveredTool, now: datetime
    ) -> Drift | None:
        fingerprint = tool.fingerprint()
        async with self._sessions() as session:
            rows = (
                await session.scalars(
                    select(ToolVersionRow).where(
                        ToolVersionRow.backend_id == backend_id, ToolVersionRow.tool == tool.name
                    )
                )
            ).all()
        published = [r for r in rows if r.state == VersionState.PUBLISHED]
        if not rows:
            await self._insert(_row(backend_id, tool, FIRST_VERSION, now, published=True))
            return None
        if published and published[-1].fingerprint == fingerprint:
            return None
        if any(r.state == VersionState.PENDING and r.fingerprint == fingerprint for r in rows):
            return None
        if not published:
            return None  # only pending rows: nothing is published to drift from
        row = _row(backend_id, tool, "", now, published=False)
        if not await self._insert(row):
            return None
        return Drift(
            backend_id=backend_id,
            tool=tool.name,
            published=VersionRecord.from_row(published[-1]),
            pending=VersionRecord.from_row(row),
        )

    async def _insert(self, row: ToolVersionRow) -> bool:
        """Insert in a transaction of its own; False when a replica inserted the same row
        first (or the backend was removed meanwhile)."""
        try:
            async with self._sessions() as session, session.begin():
                session.add(row)
        except IntegrityError:
            return False
        return True

    async def approve(
        self,
        backend_id: int,
        tool: str,
        fingerprint: str,
        version: str,
        *,
        actor: str,
        now: datetime,
        check: Any,
    ) -> VersionRecord:
        """Publish the pending contract ``fingerprint`` as ``version`` beside the published ones
        (a release makes it the stable one; the version it replaces is retired when that
        release completes). ``check(version, latest_version, latest, pending)`` returns why
        not, or None."""
        async with self._sessions() as session, session.begin():
            rows = (
                await session.scalars(
                    select(ToolVersionRow).where(
                        ToolVersionRow.backend_id == backend_id, ToolVersionRow.tool == tool
                    )
                )
            ).all()
            pending = next(
                (
                    r
                    for r in rows
                    if r.state == VersionState.PENDING and r.fingerprint == fingerprint
                ),
                None,
            )
            if pending is None:
                raise ApprovalRefused(
                    f"tool has no pending contract with fingerprint {fingerprint[:64]}",
                    not_found=True,
                )
            released = [r for r in rows if r.state != VersionState.PENDING]
            latest = max(released, key=lambda r: release_key(r.version))
            problem = check(
                version,
                latest.version,
                DiscoveredTool.from_json(latest.contract_json),
                DiscoveredTool.from_json(pending.contract_json),
            )
            if problem:
                raise ApprovalRefused(problem)
            pending.state = VersionState.PUBLISHED.value
            pending.version = version
            pending.decided_at = now
            pending.decided_by = actor
        return VersionRecord.from_row(pending)

    async def retire(self, backend_id: int, tool: str, version: str) -> bool:
        """Retire a published version (a completed release replaced it); True when it was."""
        async with self._sessions() as session, session.begin():
            result = await session.execute(
                update(ToolVersionRow)
                .where(
                    ToolVersionRow.backend_id == backend_id,
                    ToolVersionRow.tool == tool,
                    ToolVersionRow.version == version,
                    ToolVersionRow.state == VersionState.PUBLISHED.value,
                )
                .values(state=VersionState.RETIRED.value)
            )
            return bool(result.rowcount)

    async def pending_counts(self) -> dict[int, int]:
        async with self._sessions() as session:
            rows = await session.execute(
                select(ToolVersionRow.backend_id, func.count())
                .where(ToolVersionRow.state == VersionState.PENDING.value)
                .group_by(ToolVersionRow.backend_id)
            )
            return {int(backend_id): int(count) for backend_id, count in rows.all()}


def _row(
    backend_id: int, tool: DiscoveredTool, version: str, now: datetime, *, published: bool
) -> ToolVersionRow:
    return ToolVersionRow(
        backend_id=backend_id,
        tool=tool.name,
        version=version,
        state=(VersionState.PUBLISHED if published else VersionState.PENDING).value,
        fingerprint=tool.fingerprint(),
        contract_json=tool.to_json(),
        discovered_at=now,
        decided_at=None,
        decided_by="",
    )
