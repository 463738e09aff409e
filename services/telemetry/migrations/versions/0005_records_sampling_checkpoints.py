"""Per-request measurements on usage records, tail-sampled spans, audit retention anchors.

Expand only: every new column has a server default, so a replica of the previous release
keeps inserting (its spans are stored kept, its records count for cost only). The span indexes
that served span-based statistics go: statistics now read the usage records.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_KEY = 256
_GENESIS = "0" * 64
_PENDING = sa.text("NOT kept")


def upgrade() -> None:
    op.add_column(
        "telemetry_spans",
        sa.Column("exporter", sa.String(_KEY), nullable=False, server_default=""),
    )
    op.add_column(
        "telemetry_spans",
        sa.Column("kept", sa.Boolean(), nullable=False, server_default=sa.true()),
    )
    op.drop_index("ix_telemetry_spans_kind_end", table_name="telemetry_spans")
    op.drop_index("ix_telemetry_spans_operation_end", table_name="telemetry_spans")
    op.create_index(
        "ix_telemetry_spans_pending",
        "telemetry_spans",
        ["trace_id", "end_ns"],
        sqlite_where=_PENDING,
        postgresql_where=_PENDING,
    )

    usage: list[sa.Column[object]] = [
        sa.Column("service", sa.String(_KEY), nullable=False, server_default="unknown_service"),
        sa.Column("duration_ms", sa.Float(), nullable=True),
        sa.Column("grpc_status_code", sa.SmallInteger(), nullable=False, server_default="0"),
        sa.Column("error", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("tool_outcome", sa.SmallInteger(), nullable=False, server_default="0"),
        sa.Column("tool_duration_ms", sa.Float(), nullable=False, server_default="0"),
        sa.Column("trace_id", sa.String(32), nullable=False, server_default=""),
    ]
    for column in usage:
        op.add_column("telemetry_usage", column)
    op.create_index("ix_telemetry_usage_occurred", "telemetry_usage", ["occurred_at_ns"])
    op.create_index("ix_telemetry_usage_trace", "telemetry_usage", ["trace_id"])

    op.add_column(
        "telemetry_audit_heads",
        sa.Column("pruned_seq", sa.BigInteger(), nullable=False, server_default="0"),
    )
    op.add_column(
        "telemetry_audit_heads",
        sa.Column("pruned_hash", sa.String(64), nullable=False, server_default=_GENESIS),
    )
    op.add_column(
        "telemetry_audit_heads",
        sa.Column("pruned_checkpoint", sa.Text(), nullable=False, server_default=""),
    )
    op.create_table(
        "telemetry_audit_anchors",
        sa.Column("tenant", sa.String(_KEY), primary_key=True),
        sa.Column("day", sa.String(10), primary_key=True),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("time_ns", sa.BigInteger(), nullable=False),
        sa.Column("checkpoint", sa.Text(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("telemetry_audit_anchors")
    with op.batch_alter_table("telemetry_audit_heads") as batch:
        for name in ("pruned_checkpoint", "pruned_hash", "pruned_seq"):
            batch.drop_column(name)
    op.drop_index("ix_telemetry_usage_trace", table_name="telemetry_usage")
    op.drop_index("ix_telemetry_usage_occurred", table_name="telemetry_usage")
    with op.batch_alter_table("telemetry_usage") as batch:
        for name in (
            "trace_id",
            "tool_duration_ms",
            "tool_outcome",
            "error",
            "grpc_status_code",
            "duration_ms",
            "service",
        ):
            batch.drop_column(name)
    op.drop_index("ix_telemetry_spans_pending", table_name="telemetry_spans")
    op.create_index("ix_telemetry_spans_operation_end", "telemetry_spans", ["operation", "end_ns"])
    op.create_index("ix_telemetry_spans_kind_end", "telemetry_spans", ["kind", "end_ns"])
    with op.batch_alter_table("telemetry_spans") as batch:
        batch.drop_column("kept")
        batch.drop_column("exporter")
