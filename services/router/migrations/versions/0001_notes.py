"""Session notes of the save_note tool: the table create_all made before migrations.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "router_notes",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("session_id", sa.String(128), nullable=False),
        sa.Column("idempotency_key", sa.String(128), nullable=False),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        # A retried write carries the same key and must never write twice.
        sa.UniqueConstraint("tenant", "idempotency_key", name="uq_router_notes_tenant_key"),
    )
    op.create_index("ix_router_notes_session", "router_notes", ["tenant", "session_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_router_notes_session", table_name="router_notes")
    op.drop_table("router_notes")
