"""Session notes written by the save_note tool: tenant-scoped, idempotent by key."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import DateTime, Index, Integer, String, Text, UniqueConstraint, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    """The router's tables; services/router/migrations creates and changes them."""


class NoteRow(Base):
    __tablename__ = "router_notes"
    __table_args__ = (
        # A retried write carries the same key and must never write twice.
        UniqueConstraint("tenant", "idempotency_key", name="uq_router_notes_tenant_key"),
        Index("ix_router_notes_session", "tenant", "session_id", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant: Mapped[str] = mapped_column(String(128))
    session_id: Mapped[str] = mapped_column(String(128))
    idempotency_key: Mapped[str] = mapped_column(String(128))
    request_id: Mapped[str] = mapped_column(String(128))
    text: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


@dataclass(frozen=True)
class Note:
    id: int
    session_id: str
    text: str
    created_at: datetime

    @classmethod
    def from_row(cls, row: NoteRow) -> Note:
        created = row.created_at
        # SQLite hands back naive datetimes; they were written in UTC.
        if created.tzinfo is None:
            created = created.replace(tzinfo=UTC)
        return cls(id=row.id, session_id=row.session_id, text=row.text, created_at=created)


class KeyReusedError(Exception):
    """The idempotency key was already used for a different note."""


class NotesStore:
    def __init__(self, sessions: async_sessionmaker[Any]) -> None:
        self._sessions = sessions

    async def save(
        self, *, tenant: str, session_id: str, idempotency_key: str, request_id: str, text: str
    ) -> tuple[Note, bool]:
        """Store a note once per (tenant, key); returns the note and whether it was a replay."""
        row = NoteRow(
            tenant=tenant,
            session_id=session_id,
            idempotency_key=idempotency_key,
            request_id=request_id,
            text=text,
            created_at=datetime.now(UTC),
        )
        try:
            async with self._sessions() as session, session.begin():
                session.add(row)
            return Note.from_row(row), False
        except IntegrityError:
            existing = await self._by_key(tenant, idempotency_key)
            if existing is None:  # the unique violation was not ours: report it as it is
                raise
            if existing.session_id != session_id or existing.text != text:
                raise KeyReusedError from None
            return existing, True

    async def _by_key(self, tenant: str, idempotency_key: str) -> Note | None:
        async with self._sessions() as session:
            found = await session.scalar(
                select(NoteRow).where(
                    NoteRow.tenant == tenant, NoteRow.idempotency_key == idempotency_key
                )
            )
            return Note.from_row(found) if found is not None else None

    async def list(self, *, tenant: str, session_id: str, limit: int) -> list[Note]:
        """The session's most recent notes, oldest first."""
        async with self._sessions() as session:
            rows = await session.scalars(
                select(NoteRow)
                .where(NoteRow.tenant == tenant, NoteRow.session_id == session_id)
                .order_by(NoteRow.id.desc())
                .limit(limit)
            )
            return [Note.from_row(row) for row in reversed(rows.all())]
