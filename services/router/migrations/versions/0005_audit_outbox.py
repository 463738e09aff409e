"""The router's audit outbox as tables of its database: release transitions, drift and backend
events wait there for telemetry, shared by the replicas, instead of in a file on the pod's
volume (lost with the pod when it is scaled down or drained during a telemetry outage).

Expand only: a replica of the previous release keeps its file outbox; its next start (of this
release) moves what the file still holds into the table.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The same identifier type services.kit.outbox_table uses (SQLite: the rowid alias).
ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "router_outbox",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("key", sa.String(512), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("next_attempt_at", sa.Float(), nullable=False),
        sa.Column("last_error", sa.Text(), server_default="", nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key"),
    )
    op.create_index("ix_router_outbox_due", "router_outbox", ["kind", "next_attempt_at", "id"])
    op.create_table(
        "router_outbox_dead_letters",
        sa.Column("id", ID, autoincrement=False, nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("key", sa.String(512), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("dead_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )


def downgrade() -> None:
    op.drop_table("router_outbox_dead_letters")
    op.drop_index("ix_router_outbox_due", table_name="router_outbox")
    op.drop_table("router_outbox")
