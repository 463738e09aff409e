"""Releases: their state, history and shadow tallies, and the stable version of each tool and
of the routing rules.

Expand only: new tables. A replica of the previous release ignores them (it serves the latest
version of every tool, as it always did) while the rolling update runs.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "router_releases",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("unit_kind", sa.String(16), nullable=False),
        sa.Column("unit_tenant", sa.String(128), nullable=False),
        sa.Column("unit_name", sa.String(128), nullable=False),
        sa.Column("active_key", sa.String(300), nullable=True),
        sa.Column("stable_version", sa.String(64), nullable=False),
        sa.Column("candidate_version", sa.String(64), nullable=False),
        sa.Column("plan_json", sa.Text(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("paused_state", sa.String(16), nullable=False),
        sa.Column("weight", sa.Integer(), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("failed_checks", sa.Integer(), nullable=False),
        sa.Column("passed_intervals", sa.Integer(), nullable=False),
        sa.Column("started_at", _TIME, nullable=False),
        sa.Column("updated_at", _TIME, nullable=False),
        sa.Column("stage_started_at", _TIME, nullable=False),
        sa.Column("next_check_at", _TIME, nullable=True),
        sa.Column("finished_at", _TIME, nullable=True),
        sa.Column("monitor_until", _TIME, nullable=True),
        sa.Column("started_by", sa.String(256), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("gates_json", sa.Text(), nullable=False),
        sa.Column("last_analysis_json", sa.Text(), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("lease_owner", sa.String(128), nullable=False),
        sa.Column("lease_expires_at", _TIME, nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("active_key", name="uq_router_releases_active"),
    )
    op.create_index(
        "ix_router_releases_unit",
        "router_releases",
        ["unit_kind", "unit_tenant", "unit_name", "started_at"],
    )
    op.create_table(
        "router_release_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("release_id", sa.String(32), nullable=False),
        sa.Column("at", _TIME, nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("actor", sa.String(256), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("analysis_json", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["release_id"], ["router_releases.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "ix_router_release_events_release", "router_release_events", ["release_id", "id"]
    )
    op.create_table(
        "router_release_units",
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("stable_version", sa.String(64), nullable=False),
        sa.Column("previous_version", sa.String(64), nullable=False),
        sa.Column("updated_at", _TIME, nullable=False),
        sa.Column("updated_by", sa.String(256), nullable=False),
        sa.PrimaryKeyConstraint("kind", "tenant", "name"),
    )
    op.create_table(
        "router_release_shadow",
        sa.Column("release_id", sa.String(32), nullable=False),
        sa.Column("replica", sa.String(128), nullable=False),
        sa.Column("tally_json", sa.Text(), nullable=False),
        sa.Column("updated_at", _TIME, nullable=False),
        sa.ForeignKeyConstraint(["release_id"], ["router_releases.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("release_id", "replica"),
    )


def downgrade() -> None:
    op.drop_table("router_release_shadow")
    op.drop_table("router_release_units")
    op.drop_index("ix_router_release_events_release", table_name="router_release_events")
    op.drop_table("router_release_events")
    op.drop_index("ix_router_releases_unit", table_name="router_releases")
    op.drop_table("router_releases")
