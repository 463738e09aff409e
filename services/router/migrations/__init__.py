"""Alembic migrations of the router schema (session notes; tool backends and their tools'
versions; prompt template versions and selections; releases; run by services.kit.migrations).

A schema change is a new file in versions/ whose down_revision is the latest one;
test_migrations_match_the_models (tests/unit/migrations) fails until the migrations and the
models agree. Follow docs/migrations.md (expand/contract) so old and new replicas can share
the schema during a rolling update.

This module stays light: `toolmesh migrate` imports it (and only it) from the router service.
"""

from __future__ import annotations

from services.kit.migrations import ServiceMigrations, version_table

# Per service, so services that share one PostgreSQL database keep separate histories.
VERSION_TABLE = version_table("router")  # "router_alembic_version"

MIGRATIONS = ServiceMigrations(
    service="router",
    package=__name__,
    # Any constant works ("router"); it only has to be the same for every replica and the Job.
    lock_key=0x726F75746572,
    # Databases made by the previous release's create_all have exactly revision 0001's table.
    baseline=("0001", ("router_notes",)),
)
