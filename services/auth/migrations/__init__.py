"""Alembic migrations of the auth schema (run by services.kit.migrations).

A schema change is a new file in versions/ whose down_revision is the latest one;
test_migrations_match_the_models (tests/unit/migrations) fails until the migrations and the
models agree. Follow docs/migrations.md (expand/contract) so old and new replicas can share
the schema during a rolling update.

This module stays light: `toolmesh migrate` imports it (and only it) from the auth service.
"""

from __future__ import annotations

from services.kit.migrations import ServiceMigrations, version_table

# Per service, so services that share one PostgreSQL database keep separate histories.
VERSION_TABLE = version_table("auth")  # "auth_alembic_version"

MIGRATIONS = ServiceMigrations(
    service="auth",
    package=__name__,
    # The key create_schema locked before migrations existed ("tmauth"), so a replica of the
    # previous release and one of this release starting together still take turns.
    lock_key=0x746D61757468,
    # Databases made by the previous release's create_all have exactly revision 0001's tables.
    baseline=("0001", ("auth_signing_keys", "auth_clients", "auth_revoked_tokens")),
)
