"""Running usage totals per tenant and principal, day and month, for O(1) budget checks.

Expand only; the usage stored before this revision is summed into the new table here.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27
"""

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_KEY = 256
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _starts_ns(occurred_at_ns: int) -> dict[str, int]:
    """Start of the UTC day and month of a time, as nanoseconds since the epoch."""
    day = (_EPOCH + timedelta(microseconds=occurred_at_ns // 1000)).replace(
        hour=0, minute=0, second=0, microsecond=0
    )
    return {
        period: (start - _EPOCH) // timedelta(microseconds=1) * 1000
        for period, start in (("day", day), ("month", day.replace(day=1)))
    }


def upgrade() -> None:
    totals = op.create_table(
        "telemetry_usage_totals",
        sa.Column("tenant", sa.String(_KEY), primary_key=True),
        sa.Column("principal", sa.String(_KEY), primary_key=True),
        sa.Column("period", sa.String(8), primary_key=True),
        sa.Column("period_start_ns", sa.BigInteger(), primary_key=True),
        sa.Column("tool_calls", sa.BigInteger(), nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.Column("cost_micros", sa.BigInteger(), nullable=False),
    )
    sums: dict[tuple[str, str, str, int], list[int]] = {}
    usage = op.get_bind().execute(
        sa.text(
            "SELECT tenant, principal, occurred_at_ns, tool_calls, tokens_in + tokens_out, "
            "cost_micros FROM telemetry_usage"
        )
    )
    for tenant, principal, occurred_at_ns, tool_calls, tokens, cost in usage:
        for who in {"", principal}:
            for period, start_ns in _starts_ns(occurred_at_ns).items():
                total = sums.setdefault((tenant, who, period, start_ns), [0, 0, 0])
                total[0] += tool_calls
                total[1] += tokens
                total[2] += cost
    if sums:
        op.bulk_insert(
            totals,
            [
                {
                    "tenant": tenant,
                    "principal": who,
                    "period": period,
                    "period_start_ns": start_ns,
                    "tool_calls": tool_calls,
                    "tokens": tokens,
                    "cost_micros": cost,
                }
                for (tenant, who, period, start_ns), (tool_calls, tokens, cost) in sums.items()
            ],
        )


def downgrade() -> None:
    op.drop_table("telemetry_usage_totals")
