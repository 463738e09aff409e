"""Releases in the router's database (SQLite or PostgreSQL), shared by every replica.

``router_releases`` holds each release's whole state: a replica that restarts, or another that
takes its lease, carries on exactly where it was. Every change is a conditional update on the
row's ``revision`` (and, for the analyzer, on holding the lease), so an operator's pause and an
analyzer's step can never both apply to the same revision. ``active_key`` is set while a
release is in progress and unique, so a unit never has two at once. ``router_release_units``
holds each tool's and the routing rules' stable version (prompt units keep theirs in
``router_prompt_selections``, whose candidate columns this module keeps in step).
``router_release_events`` is each release's history; ``router_release_shadow`` each replica's
shadow tally.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import (
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    and_,
    or_,
    select,
    update,
)
from sqlalchemy.engine import CursorResult
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Mapped, mapped_column

from services.router.models.prompts import PromptSelectionRow
from services.router.notes import Base
from services.router.releases.model import (
    ACTIVE,
    Analysis,
    Plan,
    Release,
    ShadowTally,
    State,
    UnitKey,
    UnitKind,
    checks_from_json,
    checks_json,
)


class ReleaseRow(Base):
    __tablename__ = "router_releases"
    __table_args__ = (
        UniqueConstraint("active_key", name="uq_router_releases_active"),
        Index("ix_router_releases_unit", "unit_kind", "unit_tenant", "unit_name", "started_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    unit_kind: Mapped[str] = mapped_column(String(16))
    unit_tenant: Mapped[str] = mapped_column(String(128))
    unit_name: Mapped[str] = mapped_column(String(128))
    # Set while the release is in progress (NULLs never collide): one per unit at a time.
    active_key: Mapped[str | None] = mapped_column(String(300), nullable=True)
    stable_version: Mapped[str] = mapped_column(String(64))
    candidate_version: Mapped[str] = mapped_column(String(64))
    plan_json: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16))
    paused_state: Mapped[str] = mapped_column(String(16))
    weight: Mapped[int] = mapped_column(Integer)
    step: Mapped[int] = mapped_column(Integer)
    failed_checks: Mapped[int] = mapped_column(Integer)
    passed_intervals: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    stage_started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    next_check_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    monitor_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    started_by: Mapped[str] = mapped_column(String(256))
    reason: Mapped[str] = mapped_column(Text)
    gates_json: Mapped[str] = mapped_column(Text)
    last_analysis_json: Mapped[str] = mapped_column(Text)
    revision: Mapped[int] = mapped_column(Integer)
    lease_owner: Mapped[str] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True), nullable=True
    )


class ReleaseEventRow(Base):
    __tablename__ = "router_release_events"
    __table_args__ = (Index("ix_router_release_events_release", "release_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    release_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("router_releases.id", ondelete="CASCADE")
    )
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    action: Mapped[str] = mapped_column(String(16))
    actor: Mapped[str] = mapped_column(String(256))
    detail: Mapped[str] = mapped_column(Text)
    analysis_json: Mapped[str] = mapped_column(Text)


class UnitRow(Base):
    """The stable version of a tool or of the routing rules."""

    __tablename__ = "router_release_units"

    kind: Mapped[str] = mapped_column(String(16), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    stable_version: Mapped[str] = mapped_column(String(64))
    # The version a promotion replaced, kept ready while the release is monitored.
    previous_version: Mapped[str] = mapped_column(String(64))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_by: Mapped[str] = mapped_column(String(256))


class ShadowRow(Base):
    """One replica's shadow tally of one release (summed over replicas when judged)."""

    __tablename__ = "router_release_shadow"

    release_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("router_releases.id", ondelete="CASCADE"), primary_key=True
    )
    replica: Mapped[str] = mapped_column(String(128), primary_key=True)
    tally_json: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


def _utc(value: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes; they were written in UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def _at(value: datetime) -> datetime:
    utc = _utc(value)
    assert utc is not None
    return utc


@dataclass(frozen=True)
class Event:
    at: datetime
    action: str
    actor: str
    detail: str = ""
    analysis: Analysis | None = None


@dataclass(frozen=True)
class Unit:
    stable_version: str
    previous_version: str


class ActiveReleaseError(Exception):
    """The unit already has a release in progress."""

    def __init__(self, release_id: str) -> None:
        super().__init__(release_id)
        self.release_id = release_id


def _release(row: ReleaseRow) -> Release:
    return Release(
        id=row.id,
        unit=UnitKey(UnitKind(row.unit_kind), row.unit_tenant, row.unit_name),
        stable_version=row.stable_version,
        candidate_version=row.candidate_version,
        plan=Plan.from_json(row.plan_json),
        state=State(row.state),
        paused_state=State(row.paused_state) if row.paused_state else None,
        weight=row.weight,
        step=row.step,
        failed_checks=row.failed_checks,
        passed_intervals=row.passed_intervals,
        started_at=_at(row.started_at),
        updated_at=_at(row.updated_at),
        stage_started_at=_at(row.stage_started_at),
        next_check_at=_utc(row.next_check_at),
        finished_at=_utc(row.finished_at),
        monitor_until=_utc(row.monitor_until),
        started_by=row.started_by,
        reason=row.reason,
        gates=checks_from_json(row.gates_json),
        last_analysis=Analysis.from_json(row.last_analysis_json),
        revision=row.revision,
        lease_owner=row.lease_owner,
        lease_expires_at=_utc(row.lease_expires_at),
    )


def _columns(release: Release) -> dict[str, Any]:
    """The mutable columns of ``release`` (everything but identity and lease)."""
    return {
        "active_key": release.unit.active_key if release.active else None,
        "stable_version": release.stable_version,
        "candidate_version": release.candidate_version,
        "plan_json": release.plan.to_json(),
        "state": release.state.value,
        "paused_state": release.paused_state.value if release.paused_state else "",
        "weight": release.weight,
        "step": release.step,
        "failed_checks": release.failed_checks,
        "passed_intervals": release.passed_intervals,
        "updated_at": release.updated_at,
        "stage_started_at": release.stage_started_at,
        "next_check_at": release.next_check_at,
        "finished_at": release.finished_at,
        "monitor_until": release.monitor_until,
        "reason": release.reason,
        "gates_json": checks_json(release.gates),
        "last_analysis_json": release.last_analysis.to_json() if release.last_analysis else "",
    }


def _event_row(release_id: str, event: Event) -> ReleaseEventRow:
    return ReleaseEventRow(
        release_id=release_id,
        at=event.at,
        action=event.action,
        actor=event.actor,
        detail=event.detail,
        analysis_json=event.analysis.to_json() if event.analysis else "",
    )


class ReleaseStore:
    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    # -- stable versions ------------------------------------------------------------------------

    async def units(self) -> dict[UnitKey, Unit]:
        async with self._sessions() as session:
            rows = (await session.scalars(select(UnitRow))).all()
        return {
            UnitKey(UnitKind(r.kind), r.tenant, r.name): Unit(r.stable_version, r.previous_version)
            for r in rows
        }

    async def ensure_unit(self, key: UnitKey, version: str, *, by: str, now: datetime) -> str:
        """The unit's stable version; on first sight ``version`` becomes it (the first
        replica to write wins)."""
        async with self._sessions() as session:
            row = await session.get(UnitRow, (key.kind.value, key.tenant, key.name))
        if row is not None:
            return row.stable_version
        try:
            async with self._sessions() as session, session.begin():
                session.add(
                    UnitRow(
                        kind=key.kind.value,
                        tenant=key.tenant,
                        name=key.name,
                        stable_version=version,
                        previous_version="",
                        updated_at=now,
                        updated_by=by,
                    )
                )
        except IntegrityError:
            async with self._sessions() as session:
                row = await session.get(UnitRow, (key.kind.value, key.tenant, key.name))
            assert row is not None
            return row.stable_version
        return version

    async def _set_stable(
        self,
        session: AsyncSession,
        key: UnitKey,
        stable: str,
        previous: str,
        *,
        by: str,
        now: datetime,
    ) -> None:
        if key.kind is UnitKind.PROMPT:
            await session.execute(
                update(PromptSelectionRow)
                .where(PromptSelectionRow.tenant == key.tenant, PromptSelectionRow.name == key.name)
                .values(stable_version=int(stable), updated_at=now, updated_by=by)
            )
            return
        await session.execute(
            update(UnitRow)
            .where(UnitRow.kind == key.kind.value, UnitRow.tenant == key.tenant)
            .where(UnitRow.name == key.name)
            .values(stable_version=stable, previous_version=previous, updated_at=now, updated_by=by)
        )

    async def _mirror_prompt(self, session: AsyncSession, release: Release) -> None:
        """A prompt release's candidate and weight where PromptStore reads them."""
        serving = release.state in (State.CANARY, State.PAUSED) and release.weight > 0
        await session.execute(
            update(PromptSelectionRow)
            .where(
                PromptSelectionRow.tenant == release.unit.tenant,
                PromptSelectionRow.name == release.unit.name,
            )
            .values(
                candidate_version=int(release.candidate_version) if serving else None,
                candidate_weight=release.weight if serving else 0,
            )
        )

    # -- releases -------------------------------------------------------------------------------

    async def create(
        self,
        release: Release,
        events: list[Event],
        *,
        stable: tuple[str, str] | None = None,
    ) -> None:
        """Store a new release (and, for IMMEDIATE, the unit's new stable version ``stable`` as
        (stable, previous)); ActiveReleaseError when the unit has one in progress."""
        row = ReleaseRow(
            id=release.id,
            unit_kind=release.unit.kind.value,
            unit_tenant=release.unit.tenant,
            unit_name=release.unit.name,
            started_at=release.started_at,
            started_by=release.started_by,
            revision=release.revision,
            lease_owner="",
            lease_expires_at=None,
            **_columns(release),
        )
        try:
            async with self._sessions() as session, session.begin():
                session.add(row)
                await session.flush()
                session.add_all([_event_row(release.id, e) for e in events])
                if stable is not None:
                    await self._set_stable(
                        session,
                        release.unit,
                        *stable,
                        by=release.started_by,
                        now=release.started_at,
                    )
                if release.unit.kind is UnitKind.PROMPT:
                    await self._mirror_prompt(session, release)
        except IntegrityError:
            active = await self.active_for(release.unit)
            if active is None:
                raise
            raise ActiveReleaseError(active.id) from None

    async def update(
        self,
        before: Release,
        after: Release,
        events: list[Event],
        *,
        owner: str = "",
        now: datetime | None = None,
        stable: tuple[str, str] | None = None,
    ) -> bool:
        """Write ``after`` if the row is still at ``before.revision`` (and, with ``owner``, its
        lease is ``owner``'s and unexpired at ``now``), with ``events`` and the unit's new
        (stable, previous) versions, in one transaction. False when someone changed it first."""
        condition = and_(ReleaseRow.id == before.id, ReleaseRow.revision == before.revision)
        if owner:
            assert now is not None
            condition = and_(
                condition, ReleaseRow.lease_owner == owner, ReleaseRow.lease_expires_at > now
            )
        async with self._sessions() as session, session.begin():
            result = await session.execute(
                update(ReleaseRow)
                .where(condition)
                .values(revision=before.revision + 1, **_columns(after))
            )
            if cast(CursorResult[Any], result).rowcount != 1:
                return False
            session.add_all([_event_row(before.id, e) for e in events])
            if stable is not None:
                await self._set_stable(
                    session,
                    after.unit,
                    *stable,
                    by=events[0].actor if events else "router",
                    now=after.updated_at,
                )
            if after.unit.kind is UnitKind.PROMPT:
                await self._mirror_prompt(session, after)
        return True

    async def get(self, release_id: str) -> Release | None:
        async with self._sessions() as session:
            row = await session.get(ReleaseRow, release_id)
        return _release(row) if row is not None else None

    async def active(self) -> list[Release]:
        async with self._sessions() as session:
            rows = (
                await session.scalars(select(ReleaseRow).where(ReleaseRow.active_key.is_not(None)))
            ).all()
        return [_release(r) for r in rows]

    async def active_for(self, key: UnitKey) -> Release | None:
        async with self._sessions() as session:
            row = await session.scalar(
                select(ReleaseRow).where(ReleaseRow.active_key == key.active_key)
            )
        return _release(row) if row is not None else None

    async def listing(
        self,
        *,
        tenants: list[str] | None,
        unit: UnitKey | None,
        active_only: bool,
        limit: int,
    ) -> list[Release]:
        """Newest first; ``tenants`` None: every owner's."""
        query = select(ReleaseRow)
        if tenants is not None:
            query = query.where(ReleaseRow.unit_tenant.in_(tenants))
        if unit is not None:
            query = query.where(
                ReleaseRow.unit_kind == unit.kind.value,
                ReleaseRow.unit_tenant == unit.tenant,
                ReleaseRow.unit_name == unit.name,
            )
        if active_only:
            query = query.where(ReleaseRow.state.in_([s.value for s in ACTIVE]))
        query = query.order_by(ReleaseRow.started_at.desc(), ReleaseRow.id).limit(limit)
        async with self._sessions() as session:
            rows = (await session.scalars(query)).all()
        return [_release(r) for r in rows]

    async def with_events(self, release_id: str) -> tuple[Release, list[Event]] | None:
        """The release and its history as of one revision: read again when a change landed
        between the two reads (whatever the database's isolation level)."""
        for _ in range(5):
            before = await self.get(release_id)
            if before is None:
                return None
            events = await self.events(release_id)
            after = await self.get(release_id)
            if after is not None and after.revision == before.revision:
                return after, events
        latest = await self.get(release_id)
        return (latest, await self.events(release_id)) if latest is not None else None

    async def events(self, release_id: str) -> list[Event]:
        async with self._sessions() as session:
            rows = (
                await session.scalars(
                    select(ReleaseEventRow)
                    .where(ReleaseEventRow.release_id == release_id)
                    .order_by(ReleaseEventRow.id)
                )
            ).all()
        return [
            Event(_at(r.at), r.action, r.actor, r.detail, Analysis.from_json(r.analysis_json))
            for r in rows
        ]

    # -- the analyzer's lease -------------------------------------------------------------------

    async def take_lease(self, release_id: str, owner: str, now: datetime, ttl_s: float) -> bool:
        """Hold (or renew) the release's lease until now + ttl_s: only when it is free,
        expired or already ``owner``'s. One conditional update, so two replicas never both
        succeed for the same moment."""
        async with self._sessions() as session, session.begin():
            result = await session.execute(
                update(ReleaseRow)
                .where(
                    ReleaseRow.id == release_id,
                    ReleaseRow.active_key.is_not(None),
                    or_(
                        ReleaseRow.lease_owner == owner,
                        ReleaseRow.lease_owner == "",
                        ReleaseRow.lease_expires_at.is_(None),
                        ReleaseRow.lease_expires_at < now,
                    ),
                )
                .values(lease_owner=owner, lease_expires_at=now + timedelta(seconds=ttl_s))
            )
            return cast(CursorResult[Any], result).rowcount == 1

    async def drop_leases(self, owner: str) -> None:
        """Let every lease ``owner`` holds go (a replica stopping), so another takes over at
        once instead of after the lease expires."""
        async with self._sessions() as session, session.begin():
            await session.execute(
                update(ReleaseRow)
                .where(ReleaseRow.lease_owner == owner)
                .values(lease_owner="", lease_expires_at=None)
            )

    # -- shadow tallies -------------------------------------------------------------------------

    async def add_shadow(
        self, release_id: str, replica: str, tally: ShadowTally, now: datetime
    ) -> None:
        """Add ``tally`` to this replica's running tally of the release."""
        for _ in range(3):
            async with self._sessions() as session:
                row = await session.get(ShadowRow, (release_id, replica))
            if row is not None:
                stored = ShadowTally.from_json(row.tally_json)
                stored.merge(tally)
                async with self._sessions() as session, session.begin():
                    await session.execute(
                        update(ShadowRow)
                        .where(ShadowRow.release_id == release_id, ShadowRow.replica == replica)
                        .values(tally_json=stored.to_json(), updated_at=now)
                    )
                return
            try:
                async with self._sessions() as session, session.begin():
                    session.add(
                        ShadowRow(
                            release_id=release_id,
                            replica=replica,
                            tally_json=tally.to_json(),
                            updated_at=now,
                        )
                    )
            except IntegrityError:
                continue
            return

    async def shadow(self, release_id: str) -> ShadowTally:
        async with self._sessions() as session:
            rows = (
                await session.scalars(select(ShadowRow).where(ShadowRow.release_id == release_id))
            ).all()
        total = ShadowTally()
        for row in rows:
            total.merge(ShadowTally.from_json(row.tally_json))
        return total
