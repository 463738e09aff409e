"""Acknowledgment order of a session's turns, and request claims (idempotency keys).

Expand step: new nullable columns, a new index and a new table; the previous release ignores
them. Turns and sessions it writes during a rolling update leave the new columns NULL, which
this release reads as "acknowledged when created" and "no order key yet" (see store.py), so
the contract step that makes them NOT NULL can wait for a later release.

Existing turns get their creation time as acknowledgment time, and each session the order key
of its last turn. On a large PostgreSQL table build the index with ``CREATE INDEX CONCURRENTLY
ix_memory_turns_ack_order ...`` before the release (docs/migrations.md); this revision then
finds it in place.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("memory_turns") as batch:
        batch.add_column(sa.Column("acknowledged_at_ns", sa.BigInteger(), nullable=True))
    op.execute(
        "UPDATE memory_turns SET acknowledged_at_ns = created_at_ns"
        " WHERE acknowledged_at_ns IS NULL"
    )
    op.create_index(
        "ix_memory_turns_ack_order",
        "memory_turns",
        ["tenant", "session_id", "acknowledged_at_ns", "request_id"],
        if_not_exists=True,
    )

    with op.batch_alter_table("memory_sessions") as batch:
        batch.add_column(sa.Column("last_acknowledged_at_ns", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("last_request_id", sa.String(128), nullable=True))
    # Each session's order key: that of its last turn.
    op.execute(
        "UPDATE memory_sessions SET"
        " last_acknowledged_at_ns = (SELECT t.acknowledged_at_ns FROM memory_turns t"
        " WHERE t.tenant = memory_sessions.tenant AND t.session_id = memory_sessions.session_id"
        " AND t.seq = memory_sessions.last_seq),"
        " last_request_id = (SELECT t.request_id FROM memory_turns t"
        " WHERE t.tenant = memory_sessions.tenant AND t.session_id = memory_sessions.session_id"
        " AND t.seq = memory_sessions.last_seq)"
    )

    op.create_table(
        "memory_requests",
        sa.Column("tenant", sa.String(128), primary_key=True),
        sa.Column("request_id", sa.String(128), primary_key=True),
        sa.Column("session_id", sa.String(128), nullable=False),
        sa.Column("fingerprint", sa.String(128), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("response", sa.LargeBinary(), nullable=True),
        sa.Column("lease_expires_at_ns", sa.BigInteger(), nullable=False),
        sa.Column("created_at_ns", sa.BigInteger(), nullable=False),
        sa.Column("completed_at_ns", sa.BigInteger(), nullable=True),
        sa.Column("window_start_ns", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_memory_requests_window", "memory_requests", ["window_start_ns"])


def downgrade() -> None:
    op.drop_index("ix_memory_requests_window", table_name="memory_requests")
    op.drop_table("memory_requests")
    with op.batch_alter_table("memory_sessions") as batch:
        batch.drop_column("last_request_id")
        batch.drop_column("last_acknowledged_at_ns")
    op.drop_index("ix_memory_turns_ack_order", table_name="memory_turns")
    with op.batch_alter_table("memory_turns") as batch:
        batch.drop_column("acknowledged_at_ns")
