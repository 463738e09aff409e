"""The routing rules version a request was routed by (release figures per rules version).

Expand only: the column has a server default, so a replica of the previous release keeps
inserting (its records name no rules version and count for no routing release).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_KEY = 256


def upgrade() -> None:
    op.add_column(
        "telemetry_usage",
        sa.Column("rules_version", sa.String(_KEY), nullable=False, server_default=""),
    )


def downgrade() -> None:
    with op.batch_alter_table("telemetry_usage") as batch:
        batch.drop_column("rules_version")
