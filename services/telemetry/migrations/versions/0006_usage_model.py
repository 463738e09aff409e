"""The model and prompt versions a usage record's tokens came from.

Expand only: both columns have a server default, so a replica of the previous release keeps
inserting (its records name no model and are priced with the default token prices).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_KEY = 256


def upgrade() -> None:
    op.add_column(
        "telemetry_usage", sa.Column("model", sa.String(_KEY), nullable=False, server_default="")
    )
    op.add_column(
        "telemetry_usage",
        sa.Column("prompts", sa.String(512), nullable=False, server_default=""),
    )


def downgrade() -> None:
    with op.batch_alter_table("telemetry_usage") as batch:
        batch.drop_column("prompts")
        batch.drop_column("model")
