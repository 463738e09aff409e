"""Hash-chained audit events and the per-tenant chain heads (expand only).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_KEY = 256


def upgrade() -> None:
    op.create_table(
        "telemetry_audit",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("tenant", sa.String(_KEY), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("event_id", sa.String(_KEY), nullable=False),
        sa.Column("occurred_at_ns", sa.BigInteger(), nullable=False),
        sa.Column("actor", sa.String(_KEY), nullable=False),
        sa.Column("action", sa.String(_KEY), nullable=False),
        sa.Column("target", sa.Text(), nullable=False),
        sa.Column("outcome", sa.String(_KEY), nullable=False),
        sa.Column("request_id", sa.String(_KEY), nullable=False),
        sa.Column("trace_id", sa.String(_KEY), nullable=False),
        sa.Column("policy_version", sa.String(_KEY), nullable=False),
        sa.Column("contract_versions", sa.Text(), nullable=False),
        sa.Column("details_json", sa.Text(), nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.UniqueConstraint("tenant", "event_id", name="uq_telemetry_audit_event"),
    )
    op.create_index("ix_telemetry_audit_tenant_seq", "telemetry_audit", ["tenant", "seq"])
    op.create_table(
        "telemetry_audit_heads",
        sa.Column("tenant", sa.String(_KEY), primary_key=True),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("telemetry_audit_heads")
    op.drop_table("telemetry_audit")
