"""Usage ledger, budgets, reservations and the per-tenant budget lock rows (expand only).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_KEY = 256


def _id() -> sa.Column[int]:
    return sa.Column(
        "id",
        sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
        primary_key=True,
        autoincrement=True,
    )


def _text(name: str, length: int = _KEY) -> sa.Column[str]:
    return sa.Column(name, sa.String(length), nullable=False)


def _int(name: str) -> sa.Column[int]:
    return sa.Column(name, sa.BigInteger(), nullable=False)


def upgrade() -> None:
    op.create_table(
        "telemetry_usage",
        _id(),
        _text("tenant"),
        _text("request_id"),
        _text("principal"),
        _text("route"),
        _text("tool_name"),
        _text("tool_version"),
        _int("tokens_in"),
        _int("tokens_out"),
        _int("tool_calls"),
        _int("cost_units"),
        _int("cost_micros"),
        _text("currency", 3),
        _text("price_version"),
        _int("occurred_at_ns"),
        _text("day", 10),
        _text("outcome"),
        _text("reservation_id", 32),
        sa.UniqueConstraint("tenant", "request_id", name="uq_telemetry_usage_request"),
    )
    op.create_index(
        "ix_telemetry_usage_tenant_occurred", "telemetry_usage", ["tenant", "occurred_at_ns"]
    )
    op.create_table(
        "telemetry_budgets",
        _id(),
        _text("tenant"),
        _text("principal"),
        _text("period", 8),
        _int("limit_tool_calls"),
        _int("limit_tokens"),
        _int("limit_cost_micros"),
        _int("updated_at_ns"),
        sa.UniqueConstraint("tenant", "principal", "period", name="uq_telemetry_budgets_scope"),
    )
    op.create_table(
        "telemetry_reservations",
        sa.Column("id", sa.String(32), primary_key=True),
        _text("tenant"),
        _text("principal"),
        _text("request_id"),
        _int("tool_calls"),
        _int("tokens"),
        _int("cost_micros"),
        _int("created_at_ns"),
        _int("expires_at_ns"),
        sa.UniqueConstraint("tenant", "request_id", name="uq_telemetry_reservations_request"),
    )
    op.create_index(
        "ix_telemetry_reservations_expires", "telemetry_reservations", ["expires_at_ns"]
    )
    op.create_table(
        "telemetry_budget_locks",
        sa.Column("tenant", sa.String(_KEY), primary_key=True),
    )


def downgrade() -> None:
    for table in (
        "telemetry_budget_locks",
        "telemetry_reservations",
        "telemetry_budgets",
        "telemetry_usage",
    ):
        op.drop_table(table)
