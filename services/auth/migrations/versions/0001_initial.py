"""Signing keys, clients and revoked tokens: the tables create_all made before migrations.

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


def upgrade() -> None:
    op.create_table(
        "auth_clients",
        sa.Column("client_id", sa.String(64), nullable=False),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("scopes", sa.Text(), nullable=False),
        sa.Column("roles", sa.Text(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("secret_hash", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("client_id"),
    )
    op.create_index("ix_auth_clients_state", "auth_clients", ["state"])
    op.create_index("ix_auth_clients_tenant", "auth_clients", ["tenant"])
    op.create_table(
        "auth_revoked_tokens",
        sa.Column("jti", sa.String(64), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.Column("revoked_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("jti"),
    )
    op.create_index("ix_auth_revoked_tokens_expires_at", "auth_revoked_tokens", ["expires_at"])
    op.create_table(
        "auth_signing_keys",
        sa.Column("kid", sa.String(64), nullable=False),
        sa.Column("alg", sa.String(16), nullable=False),
        sa.Column("public_x", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("dev", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("state_changed_at", sa.Float(), nullable=True),
        sa.Column("signs_from", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("kid"),
    )
    # At most one active key, even when two replicas rotate at once.
    op.create_index(
        "auth_one_active_key",
        "auth_signing_keys",
        ["state"],
        unique=True,
        sqlite_where=sa.text("state = 'active'"),
        postgresql_where=sa.text("state = 'active'"),
    )
    op.create_index("ix_auth_signing_keys_state", "auth_signing_keys", ["state"])


def downgrade() -> None:
    op.drop_index("ix_auth_signing_keys_state", table_name="auth_signing_keys")
    op.drop_index("auth_one_active_key", table_name="auth_signing_keys")
    op.drop_table("auth_signing_keys")
    op.drop_index("ix_auth_revoked_tokens_expires_at", table_name="auth_revoked_tokens")
    op.drop_table("auth_revoked_tokens")
    op.drop_index("ix_auth_clients_tenant", table_name="auth_clients")
    op.drop_index("ix_auth_clients_state", table_name="auth_clients")
    op.drop_table("auth_clients")
