"""Append-only audit trail, hash-chained per tenant, and the verifier that finds tampering.

Each stored event gets the tenant's next seq and prev_hash (the hash of the event before), and
hash = SHA-256 of the canonical JSON of seq, prev_hash and every event field. Appends of one
tenant are serialized on its row of telemetry_audit_heads, which also records the chain head:
that is how a deleted last event, or one added after it, is found.

The chain alone cannot catch someone who rewrites the database consistently, so it is also
compared with the newest signed checkpoint kept outside the database (services.telemetry.
checkpoints): a different hash at the checkpoint's seq is a rewrite, a chain ending before it a
truncation, no events at all a wipe. Retention may delete a chain's oldest events, but only up
to a signed checkpoint at least as old as the retention (recorded in the head row, signature
and all), so the rest of the chain still links to something verifiable.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BigInteger,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    delete,
    func,
    select,
    update,
)
from sqlalchemy.orm import Mapped, mapped_column

from services.kit.audit import action_name
from services.kit.limits import MAX_KEY_CHARS
from services.telemetry.checkpoints import Checkpoint, Keyring
from services.telemetry.database import Base, Database
from toolmesh.common.v1 import audit_pb2

log = logging.getLogger(__name__)

GENESIS = "0" * 64
DEAD_LETTER = action_name(audit_pb2.AUDIT_ACTION_AUDIT_DEAD_LETTER)
# Events deleted per transaction by retention.
DELETE_CHUNK = 5000
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
    # Events up to pruned_seq were deleted by retention; pruned_hash is the hash of that
    # event, and pruned_checkpoint the signed checkpoint entry (JSON) that vouches for it.
    pruned_seq: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    pruned_hash: Mapped[str] = mapped_column(String(64), nullable=False, server_default=GENESIS)
    pruned_checkpoint: Mapped[str] = mapped_column(Text, nullable=False, server_default="")


class AuditAnchorRow(Base):
    """A tenant's first checkpoint of each UTC day, copied from the log with its signature:
    where retention may later cut the chain. Not trusted: its signature is checked on use."""

    __tablename__ = "telemetry_audit_anchors"

    tenant: Mapped[str] = mapped_column(String(MAX_KEY_CHARS), primary_key=True)
    day: Mapped[str] = mapped_column(String(10), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, nullable=False)
    time_ns: Mapped[int] = mapped_column(BigInteger, nullable=False)
    checkpoint: Mapped[str] = mapped_column(Text, nullable=False)


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
    # "edited", "deleted", "inserted", "reordered", "rewritten", "truncated", "wiped" or
    # "checkpoint_invalid"
    kind: str
    seq: int
    event_id: str
    message: str


@dataclass(frozen=True)
class Verdict:
    checked: int
    head_seq: int
    head_hash: str
    problem: Problem | None
    dead_letters: int = 0
    pruned_seq: int = 0
    checkpoint: Checkpoint | None = None


@dataclass(frozen=True)
class Start:
    """Where a (possibly pruned, or partial) chain starts: after seq, linking to hash."""

    seq: int = 0
    hash: str = GENESIS


@dataclass(frozen=True)
class Head:
    tenant: str
    seq: int
    hash: str
    pruned: Start


def _link_problem(
    rows: Sequence[Any], i: int, hashes: dict[str, int], start: Start
) -> Problem | None:
    """Why rows[i].prev_hash is not the hash of rows[i - 1] (seq continuing), if it is not."""
    row = rows[i]
    expected = rows[i - 1].hash if i else start.hash
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
    if row.prev_hash != start.hash:
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


def verify_chain(
    rows: Sequence[Any], head_seq: int, head_hash: str, start: Start = Start()
) -> Verdict:
    """The first problem of a chain given its rows in (seq, id) order and the recorded head;
    ``start`` is where the rows begin (after a pruned prefix, or a checkpoint).

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
        elif row.seq != start.seq + i + 1:
            missing = start.seq + i + 1
            problem = Problem(
                "deleted",
                missing,
                "",
                f"seq {missing} is missing (the next stored event is seq {row.seq}, "
                f"{row.event_id}, which links to hash {row.prev_hash})",
            )
        else:
            problem = _link_problem(rows, i, hashes, start)
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
    last_seq = rows[-1].seq if rows else start.seq
    problem = None
    if last_seq < head_seq:
        problem = Problem(
            "deleted",
            last_seq + 1,
            "",
            f"seq {last_seq + 1} to {head_seq} are missing: the chain head is seq {head_seq}",
        )
    elif last_seq > head_seq or (rows and rows[-1].hash != head_hash):
        extra = rows[max(0, head_seq - start.seq)] if last_seq > head_seq else rows[-1]
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

    async def page(
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

    async def verify(self, tenant: str, trust: CheckpointTrust) -> Verdict:
        """Walk the chain in one snapshot-consistent read, then hold it against the newest
        signed checkpoint of the tenant."""
        async with self._db.engine.connect() as conn, conn.begin():
            # One snapshot: an append committing meanwhile must not look like tampering.
            await conn.exec_driver_sql(
                "BEGIN" if self._db.is_sqlite else "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"
            )
            head = (
                await conn.execute(select(AuditHeadRow).where(AuditHeadRow.tenant == tenant))
            ).first()
            rows = (
                await conn.execute(
                    select(AuditRow)
                    .where(AuditRow.tenant == tenant)
                    .order_by(AuditRow.seq, AuditRow.id)
                )
            ).all()
        head_seq, head_hash = (head.seq, head.hash) if head else (0, GENESIS)
        pruned = Start(head.pruned_seq, head.pruned_hash) if head else Start()
        # A crash between recording a prune and deleting its events leaves some behind.
        rows = [row for row in rows if row.seq > pruned.seq]
        dead_letters = sum(1 for row in rows if row.action == DEAD_LETTER)
        checkpoint = trust.latest
        problem = trust.problem or _pruning_problem(
            tenant, pruned, head.pruned_checkpoint if head else "", trust
        )
        if problem is None and checkpoint is not None:
            problem = _against_checkpoint(rows, pruned, checkpoint)
        chain = verify_chain(rows, head_seq, head_hash, pruned)
        if problem is None or problem.kind == "rewritten":
            # A problem of the chain itself says more than the checkpoint it breaks.
            problem = chain.problem or problem
        return Verdict(
            chain.checked, head_seq, head_hash, problem, dead_letters, pruned.seq, checkpoint
        )

    async def heads(self) -> list[Head]:
        """Every tenant's recorded head, for the periodic checkpoint."""
        async with self._db.engine.connect() as conn:
            rows = (await conn.execute(select(AuditHeadRow))).all()
        return [Head(r.tenant, r.seq, r.hash, Start(r.pruned_seq, r.pruned_hash)) for r in rows]

    async def head(self, tenant: str) -> Head | None:
        async with self._db.engine.connect() as conn:
            r = (
                await conn.execute(select(AuditHeadRow).where(AuditHeadRow.tenant == tenant))
            ).first()
        return Head(r.tenant, r.seq, r.hash, Start(r.pruned_seq, r.pruned_hash)) if r else None

    async def verify_since(self, head: Head, since: Start) -> Problem | None:
        """Whether the events after ``since`` (the last checkpoint) still link to it and up to
        ``head``: checked before a new checkpoint vouches for them."""
        start = since if since.seq > head.pruned.seq else head.pruned
        async with self._db.engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(AuditRow)
                    .where(
                        AuditRow.tenant == head.tenant,
                        AuditRow.seq >= max(start.seq, 1),
                        # Events appended since the head was read are the next checkpoint's.
                        AuditRow.seq <= head.seq,
                    )
                    .order_by(AuditRow.seq, AuditRow.id)
                )
            ).all()
        if start is since and since.seq > 0:
            at = [row for row in rows if row.seq == since.seq]
            if len(at) != 1 or at[0].hash != since.hash:
                return Problem(
                    "rewritten",
                    since.seq,
                    at[0].event_id if at else "",
                    f"seq {since.seq} is not the event the last checkpoint signed",
                )
        rows = [row for row in rows if row.seq > start.seq]
        return verify_chain(rows, head.seq, head.hash, start).problem

    async def record_anchor(self, checkpoint: Checkpoint) -> None:
        """Keep the tenant's first checkpoint of the day as a future retention cut."""
        day = time.strftime("%Y-%m-%d", time.gmtime(checkpoint.time_ns // 1_000_000_000))
        statement = (
            self._db.insert(AuditAnchorRow)
            .values(
                tenant=checkpoint.tenant,
                day=day,
                seq=checkpoint.seq,
                time_ns=checkpoint.time_ns,
                checkpoint=checkpoint.line().decode(),
            )
            .on_conflict_do_nothing(index_elements=["tenant", "day"])
        )
        async with self._db.writing(), self._db.engine.begin() as conn:
            await conn.execute(statement)

    async def prune(self, keyring: Keyring, older_than_ns: int) -> int:
        """Delete every tenant's events up to its newest anchor signed before the cut, when the
        events up to it verify; events deleted. Never past a signed checkpoint."""
        async with self._db.engine.connect() as conn:
            anchors = (
                await conn.execute(
                    select(AuditAnchorRow.tenant, func.max(AuditAnchorRow.time_ns))
                    .where(AuditAnchorRow.time_ns <= older_than_ns)
                    .group_by(AuditAnchorRow.tenant)
                )
            ).all()
        deleted = 0
        for tenant, time_ns in anchors:
            deleted += await self._prune_tenant(tenant, time_ns, keyring)
        return deleted

    async def _prune_tenant(self, tenant: str, time_ns: int, keyring: Keyring) -> int:
        async with self._db.engine.connect() as conn:
            anchor = (
                await conn.execute(
                    select(AuditAnchorRow).where(
                        AuditAnchorRow.tenant == tenant, AuditAnchorRow.time_ns == time_ns
                    )
                )
            ).first()
        head = await self.head(tenant)
        if anchor is None or head is None:
            return 0
        try:
            checkpoint = Checkpoint.parse(anchor.checkpoint)
        except ValueError:
            log.error(
                "audit retention skipped a tenant: its anchor is not a checkpoint",
                extra={"tenant": tenant},
            )
            return 0
        refusal = keyring.problem(checkpoint)
        if refusal is None and checkpoint.tenant != tenant:
            refusal = "it is another tenant's"
        if refusal is None and checkpoint.seq > head.pruned.seq:
            problem = await self._prefix_problem(head, checkpoint)
            refusal = problem.message if problem else None
        if refusal is not None:
            log.error(
                "audit retention skipped a tenant: its anchor or chain does not verify",
                extra={"tenant": tenant, "seq": checkpoint.seq, "problem": refusal},
            )
            return 0
        if checkpoint.seq > head.pruned.seq:
            async with self._db.locked(AuditHeadRow, tenant, seq=0, hash=GENESIS) as (conn, _):
                await conn.execute(
                    update(AuditHeadRow)
                    .where(AuditHeadRow.tenant == tenant)
                    .values(
                        pruned_seq=checkpoint.seq,
                        pruned_hash=checkpoint.hash,
                        pruned_checkpoint=checkpoint.line().decode(),
                    )
                )
        deleted = await self._db.delete_in_chunks(
            AuditRow,
            (AuditRow.tenant == tenant) & (AuditRow.seq <= checkpoint.seq),
            DELETE_CHUNK,
        )
        async with self._db.writing(), self._db.engine.begin() as conn:
            await conn.execute(
                delete(AuditAnchorRow).where(
                    AuditAnchorRow.tenant == tenant, AuditAnchorRow.time_ns < time_ns
                )
            )
        return deleted

    async def _prefix_problem(self, head: Head, checkpoint: Checkpoint) -> Problem | None:
        """Whether the events about to be pruned verify and end at the checkpoint's hash."""
        async with self._db.engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(AuditRow)
                    .where(
                        AuditRow.tenant == head.tenant,
                        AuditRow.seq > head.pruned.seq,
                        AuditRow.seq <= checkpoint.seq,
                    )
                    .order_by(AuditRow.seq, AuditRow.id)
                )
            ).all()
        return verify_chain(rows, checkpoint.seq, checkpoint.hash, head.pruned).problem


@dataclass(frozen=True)
class CheckpointTrust:
    """What the checkpoint log says about one tenant, for VerifyAudit."""

    latest: Checkpoint | None
    # Set when the log cannot be trusted for this tenant (checkpoint_invalid).
    problem: Problem | None
    keyring: Keyring
    # Events older than this may have been pruned (0: audit retention is off).
    prunable_before_ns: int


def _pruning_problem(
    tenant: str, pruned: Start, entry: str, trust: CheckpointTrust
) -> Problem | None:
    """Whether a pruned prefix is vouched for by a signed checkpoint old enough to prune."""
    if pruned.seq == 0:
        return None
    try:
        checkpoint = Checkpoint.parse(entry)
    except ValueError:
        checkpoint = None
    if checkpoint is None or (checkpoint.tenant, checkpoint.seq, checkpoint.hash) != (
        tenant,
        pruned.seq,
        pruned.hash,
    ):
        return Problem(
            "checkpoint_invalid",
            pruned.seq,
            "",
            f"events up to seq {pruned.seq} are recorded as pruned, but not at a checkpoint",
        )
    if bad := trust.keyring.problem(checkpoint):
        return Problem(
            "checkpoint_invalid", pruned.seq, "", f"the checkpoint events were pruned at: {bad}"
        )
    if trust.prunable_before_ns == 0 or checkpoint.time_ns > trust.prunable_before_ns:
        return Problem(
            "truncated",
            pruned.seq,
            "",
            f"events up to seq {pruned.seq} were deleted although audit retention keeps them",
        )
    return None


def _against_checkpoint(
    rows: Sequence[Any], pruned: Start, checkpoint: Checkpoint
) -> Problem | None:
    """Rewritten, truncated or wiped: the chain as stored against its newest checkpoint."""
    seq = checkpoint.seq
    where = f"the checkpoint of seq {seq} signed {_iso(checkpoint.time_ns)} ({checkpoint.log})"
    if seq <= pruned.seq:
        if seq == pruned.seq and checkpoint.hash != pruned.hash:
            return Problem(
                "rewritten", seq, "", f"the pruned chain's last hash differs from {where}"
            )
        return None
    if not rows:
        return Problem("wiped", seq, "", f"no event is stored, but {where} vouches for {seq}")
    if rows[-1].seq < seq:
        return Problem(
            "truncated",
            rows[-1].seq + 1,
            "",
            f"the chain ends at seq {rows[-1].seq}, before {where}",
        )
    at = [row for row in rows if row.seq == seq]
    if len(at) == 1 and at[0].hash == checkpoint.hash:
        return None
    return Problem(
        "rewritten",
        seq,
        at[0].event_id if at else "",
        f"seq {seq} is not the event {where} names: the chain was rewritten after it",
    )


def _iso(time_ns: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time_ns // 1_000_000_000))
