"""Spans, one row each, with the columns GetStats and GetTrace query on.

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

_KEY = 256


def upgrade() -> None:
    op.create_table(
        "telemetry_spans",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("trace_id", sa.String(32), nullable=False),
        sa.Column("span_id", sa.String(16), nullable=False),
        sa.Column("parent_span_id", sa.String(16), nullable=False),
        sa.Column("service", sa.String(_KEY), nullable=False),
        sa.Column("name", sa.String(_KEY), nullable=False),
        sa.Column("kind", sa.SmallInteger(), nullable=False),
        sa.Column("start_ns", sa.BigInteger(), nullable=False),
        sa.Column("end_ns", sa.BigInteger(), nullable=False),
        sa.Column("duration_ms", sa.Float(), nullable=False),
        sa.Column("error", sa.Boolean(), nullable=False),
        sa.Column("route", sa.String(_KEY), nullable=False),
        sa.Column("grpc_status_code", sa.Integer(), nullable=True),
        sa.Column("tool_name", sa.String(_KEY), nullable=False),
        sa.Column("tool_version", sa.String(_KEY), nullable=False),
        sa.Column("tenant", sa.String(_KEY), nullable=False),
        sa.Column("operation", sa.String(_KEY), nullable=False),
        sa.Column("attributes_json", sa.Text(), nullable=False),
        sa.UniqueConstraint("trace_id", "span_id", name="uq_telemetry_spans_id"),
    )
    op.create_index("ix_telemetry_spans_kind_end", "telemetry_spans", ["kind", "end_ns"])
    op.create_index("ix_telemetry_spans_operation_end", "telemetry_spans", ["operation", "end_ns"])
    op.create_index("ix_telemetry_spans_end", "telemetry_spans", ["end_ns"])


def downgrade() -> None:
    op.drop_table("telemetry_spans")
