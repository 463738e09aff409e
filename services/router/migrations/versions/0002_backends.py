"""Tool backends and the versions of their tools' contracts.

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
    op.create_table(
        "router_backends",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("name", sa.String(32), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("config_json", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(256), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("tenant", "name", name="uq_router_backends_tenant_name"),
    )
    op.create_table(
        "router_tool_versions",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("backend_id", sa.Integer(), nullable=False),
        sa.Column("tool", sa.String(64), nullable=False),
        sa.Column("version", sa.String(32), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("contract_json", sa.Text(), nullable=False),
        sa.Column("discovered_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("decided_by", sa.String(256), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.ForeignKeyConstraint(["backend_id"], ["router_backends.id"], ondelete="CASCADE"),
    )
    # One row per published version; one pending row per fingerprint (replicas discovering
    # the same drift at once record it once).
    op.create_index(
        "uq_router_tool_versions_version",
        "router_tool_versions",
        ["backend_id", "tool", "version"],
        unique=True,
        sqlite_where=sa.text("state != 'pending'"),
        postgresql_where=sa.text("state != 'pending'"),
    )
    op.create_index(
        "uq_router_tool_versions_pending",
        "router_tool_versions",
        ["backend_id", "tool", "fingerprint"],
        unique=True,
        sqlite_where=sa.text("state = 'pending'"),
        postgresql_where=sa.text("state = 'pending'"),
    )


def downgrade() -> None:
    op.drop_index("uq_router_tool_versions_pending", table_name="router_tool_versions")
    op.drop_index("uq_router_tool_versions_version", table_name="router_tool_versions")
    op.drop_table("router_tool_versions")
    op.drop_table("router_backends")
