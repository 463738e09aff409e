"""Revocations name the tenant whose token they revoke: primary key (tenant, jti).

Existing rows get tenant "" (any tenant), which is what they meant before. Expand-only: a
replica of the previous release still inserts by jti (its rows get the default "") and still
finds them by jti, so both can share the schema during a rolling update.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "auth_revoked_tokens"


def _primary_key(columns: list[str]) -> None:
    if op.get_bind().dialect.name == "sqlite":
        # SQLite cannot alter a primary key: the batch rebuilds the table with the new one,
        # from this definition rather than a reflected one whose columns carry the old key.
        current = sa.Table(
            TABLE,
            sa.MetaData(),
            sa.Column("tenant", sa.String(64), server_default="", nullable=False),
            sa.Column("jti", sa.String(64), nullable=False),
            sa.Column("expires_at", sa.Float(), nullable=False),
            sa.Column("revoked_at", sa.Float(), nullable=False),
            sa.Index(f"ix_{TABLE}_expires_at", "expires_at"),
        )
        with op.batch_alter_table(TABLE, copy_from=current, recreate="always") as batch:
            batch.create_primary_key(f"{TABLE}_pkey", columns)
    else:
        op.drop_constraint(f"{TABLE}_pkey", TABLE, type_="primary")
        op.create_primary_key(f"{TABLE}_pkey", TABLE, columns)


def upgrade() -> None:
    with op.batch_alter_table(TABLE) as batch:
        batch.add_column(sa.Column("tenant", sa.String(64), server_default="", nullable=False))
    _primary_key(["tenant", "jti"])


def downgrade() -> None:
    # Tenant-scoped rows of one jti collapse into one: revoked everywhere until the latest expiry.
    op.execute(
        sa.text(
            "DELETE FROM auth_revoked_tokens WHERE EXISTS (SELECT 1 FROM auth_revoked_tokens "
            "AS other WHERE other.jti = auth_revoked_tokens.jti AND (other.expires_at > "
            "auth_revoked_tokens.expires_at OR (other.expires_at = "
            "auth_revoked_tokens.expires_at AND other.tenant < auth_revoked_tokens.tenant)))"
        )
    )
    _primary_key(["jti"])
    with op.batch_alter_table(TABLE) as batch:
        batch.drop_column("tenant")
