"""Append-only audit trail, hash-chained per tenant, and the verifier that finds tampering.

Each stored event gets the tenant's next seq and prev_hash (the hash of the event before), and
hash = SHA-256 of the canonical JSON of seq, prev_hash and every event field. Appends of one
tenant are serialized on its row of telemetry_audit_heads, which also records the chain head:
that is how a deleted last event, or one added after it, is found.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import BigInteger, Index, Integer, String, Text, UniqueConstraint, select, update
from sqlalchemy.orm import Mapped, mapped_column

from services.telemetry.database import Base, Database
from services.telemetry.spans import MAX_KEY_CHARS

GENESIS = "0" * 64
# The fields of an event, in the order they are stored and hashed.
EVENT_FIELDS = (
    "event_id",
    "occurred_at_ns",
    "tenant",
    "actor",
    "action",
    "target",
    "outcome",
    "request_id",
    "trace_id",
    "policy_version",
    "contract_versions",
    "details_json",
)


class AuditRow(Base):
    __tablename__ = "telemetry_audit"
    __table_args__ = (
        # At-least-once delivery: a replayed event is stored once.
        UniqueConstraint("tenant", "event_id", name="uq_telemetry_audit_event"),
        # Not unique on purpose: a duplicate seq is tampering VerifyAudit must be able to see.
        Index("ix_telemetry_audit_tenant_seq", "tenant", "seq"),
    )

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    tenant: Mapped[str] = mapped_column(String(MAX_KEY_CHARS), nullable=False)
    seq: Mapped[int] = mapped_column(BigInteger, nullable=False)
    event_id: Mapped[str] = mapped_column(String(MAX_KEY_CHARS), nullable=False)
    occurred_at_ns: Mapped[int] = mapped_column(BigInteger, nullable=False)
    actor: Mapped[str] = mapped_column(String(MAX_KEY_CHARS), nullable=False)
    action: Mapped[str] = mapped_column(String(MAX_KEY_CHARS), nullable=False)
    target: Mapped[str] = mapped_column(Text, nullable=False)
    outcome: Mapped[str] = mapped_column(String(MAX_KEY_CHARS), nullable=False)
    request_id: Mapped[str] = mapped_column(String(MAX_KEY_CHARS), nullable=False)
    trace_id: Mapped[str] = mapped_column(String(MAX_KEY_CHARS), nullable=False)
    policy_version: Mapped[str] = mapped_column(String(MAX_KEY_CHARS), nullable=False)
    # A JSON array of strings.
    contract_versions: Mapped[str] = mapped_column(Text, nullable=False)
    details_json: Mapped[str] = mapped_column(Text, nullable=False)
    prev_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    hash: Mapped[str] = mapped_column(String(64), nullable=False)


class AuditHeadRow(Base):
    """The last seq and hash of a tenant's chain; its lock serializes the tenant's appends."""

    __tablename__ = "telemetry_audit_heads"

    tenant: Mapped[str] = mapped_column(String(MAX_KEY_CHARS), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, nullable=False)
    hash: Mapped[str] = mapped_column(String(64), nullable=False)


def event_hash(seq: int, prev_hash: str, event: dict[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON: sorted keys, no spaces, ASCII escapes."""
    payload = {"seq": seq, "prev_hash": prev_hash}
    payload.update({name: event[name] for name in EVENT_FIELDS})
    if isinstance(payload["contract_versions"], str):  # as stored: a JSON array
        payload["contract_versions"] = json.loads(payload["contract_versions"])
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class Problem:
    kind: str  # "edited", "deleted", "inserted" or "reordered"
    seq: int
    event_id: str
    message: str


@dataclass(frozen=True)
class Verdict:
    checked: int
    head_seq: int
    head_hash: str
    problem: Problem | None


def _link_problem(rows: Sequence[Any], i: int, hashes: dict[str, int]) -> Problem | None:
    """Why rows[i].prev_hash is not the hash of rows[i - 1] (seq continuing), if it is not."""
    row = rows[i]
    expected = rows[i - 1].hash if i else GENESIS
    if row.prev_hash == expected:
        return None
    target = hashes.get(row.prev_hash)
    if target is not None and target > i:
        later = rows[target]
        return Problem(
            "reordered",
            row.seq,
            row.event_id,
            f"seq {row.seq} ({row.event_id}) links to seq {later.seq} ({later.event_id}), "
            "which comes after it",
        )
    if target is not None:
        # The chain skips from rows[target] to this row: what lies between is not in it.
        intruder = rows[target + 1]
        return Problem(
            "inserted",
            intruder.seq,
            intruder.event_id,
            f"seq {intruder.seq} ({intruder.event_id}) is not linked into the chain: seq "
            f"{row.seq} links to seq {rows[target].seq}",
        )
    if row.prev_hash != GENESIS:
        return Problem(
            "deleted",
            row.seq,
            row.event_id,
            f"the event before seq {row.seq} ({row.event_id}) is missing: no stored event "
            "has the hash it links to",
        )
    return Problem(
        "inserted",
        row.seq,
        row.event_id,
        f"seq {row.seq} ({row.event_id}) does not link to the event before it",
    )


def verify_chain(rows: Sequence[Any], head_seq: int, head_hash: str) -> Verdict:
    """The first problem of a chain given its rows in (seq, id) order and the recorded head.

    Per event in order: a repeated seq (inserted), a missing seq (deleted), a link to a later
    event (reordered), to an earlier one (inserted between) or to no stored event (deleted),
    then the event's own hash (edited). Last, the chain must end at the recorded head.
    """
    hashes = {row.hash: i for i, row in enumerate(rows)}
    for i, row in enumerate(rows):
        problem: Problem | None = None
        if i and row.seq == rows[i - 1].seq:
            # Of two events with one seq, the intruder is the one the next event does not follow.
            nxt = rows[i + 1] if i + 1 < len(rows) else None
            keeps_first = nxt is None or nxt.prev_hash != row.hash
            intruder = row if keeps_first else rows[i - 1]
            problem = Problem(
                "inserted",
                intruder.seq,
                intruder.event_id,
                f"seq {row.seq} is used twice; {intruder.event_id} is not in the chain",
            )
        elif row.seq != i + 1:
            problem = Problem(
                "deleted",
                i + 1,
                "",
                f"seq {i + 1} is missing (the next stored event is seq {row.seq}, "
                f"{row.event_id}, which links to hash {row.prev_hash})",
            )
        else:
            problem = _link_problem(rows, i, hashes)
        if problem is None and event_hash(row.seq, row.prev_hash, row._mapping) != row.hash:
            problem = Problem(
                "edited",
                row.seq,
                row.event_id,
                f"seq {row.seq} ({row.event_id}) was changed after it was stored: its hash "
                "does not match its fields",
            )
        if problem is not None:
            return Verdict(i + 1, head_seq, head_hash, problem)
    last_seq = rows[-1].seq if rows else 0
    problem = None
    if last_seq < head_seq:
        problem = Problem(
            "deleted",
            last_seq + 1,
            "",
            f"seq {last_seq + 1} to {head_seq} are missing: the chain head is seq {head_seq}",
        )
    elif last_seq > head_seq or (rows and rows[-1].hash != head_hash):
        extra = rows[head_seq] if last_seq > head_seq else rows[-1]
        problem = Problem(
            "inserted",
            extra.seq,
            extra.event_id,
            f"seq {extra.seq} ({extra.event_id}) is not the recorded chain head",
        )
    return Verdict(len(rows), head_seq, head_hash, problem)


class AuditLog:
    def __init__(self, database: Database) -> None:
        self._db = database

    async def append(self, events: Sequence[dict[str, Any]]) -> tuple[int, int]:
        """Chain and store new events, one transaction per tenant; (stored, duplicates)."""
        by_tenant: dict[str, list[dict[str, Any]]] = {}
        for event in events:
            by_tenant.setdefault(event["tenant"], []).append(event)
        stored = 0
        for tenant in sorted(by_tenant):
            async with self._db.locked(AuditHeadRow, tenant, seq=0, hash=GENESIS) as (conn, head):
                ids = {event["event_id"] for event in by_tenant[tenant]}
                seen = set(
                    (
                        await conn.scalars(
                            select(AuditRow.event_id).where(
                                AuditRow.tenant == tenant, AuditRow.event_id.in_(ids)
                            )
                        )
                    ).all()
                )
                seq, prev = head.seq, head.hash
                rows = []
                for event in by_tenant[tenant]:
                    if event["event_id"] in seen:
                        continue
                    seen.add(event["event_id"])
                    seq += 1
                    digest = event_hash(seq, prev, event)
                    stored_event = {
                        **event,
                        "contract_versions": json.dumps(event["contract_versions"]),
                    }
                    rows.append({**stored_event, "seq": seq, "prev_hash": prev, "hash": digest})
                    prev = digest
                if rows:
                    await conn.execute(self._db.insert(AuditRow), rows)
                    await conn.execute(
                        update(AuditHeadRow)
                        .where(AuditHeadRow.tenant == tenant)
                        .values(seq=seq, hash=prev)
                    )
                stored += len(rows)
        return stored, len(events) - stored

    async def list(
        self, tenant: str, action: str, since_ns: int, after_seq: int, limit: int
    ) -> list[Any]:
        query = (
            select(AuditRow)
            .where(AuditRow.tenant == tenant, AuditRow.seq > after_seq)
            .order_by(AuditRow.seq, AuditRow.id)
            .limit(limit)
        )
        if action:
            query = query.where(AuditRow.action == action)
        if since_ns:
            query = query.where(AuditRow.occurred_at_ns >= since_ns)
        async with self._db.engine.connect() as conn:
            return list((await conn.execute(query)).all())

    async def verify(self, tenant: str) -> Verdict:
        """Read the head and the chain in one snapshot-consistent read and walk it."""
        async with self._db.engine.connect() as conn, conn.begin():
            # One snapshot: an append committing meanwhile must not look like tampering.
            await conn.exec_driver_sql(
                "BEGIN" if self._db.is_sqlite else "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"
            )
            head = (
                await conn.execute(
                    select(AuditHeadRow.seq, AuditHeadRow.hash).where(AuditHeadRow.tenant == tenant)
                )
            ).first()
            rows = (
                await conn.execute(
                    select(AuditRow)
                    .where(AuditRow.tenant == tenant)
                    .order_by(AuditRow.seq, AuditRow.id)
                )
            ).all()
        head_seq, head_hash = (head.seq, head.hash) if head else (0, GENESIS)
        return verify_chain(rows, head_seq, head_hash)
