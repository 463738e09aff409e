"""Alembic migrations of the telemetry schema (run by services.kit.migrations).

A schema change is a new file in versions/ whose down_revision is the latest one;
test_migrations_match_the_models fails until the migrations and the models agree. Follow
docs/migrations.md (expand/contract) so old and new replicas can share the schema.

This module stays light: `toolmesh migrate` imports it (and only it) from the telemetry service.
"""

from __future__ import annotations

from services.kit.migrations import ServiceMigrations, version_table

# Per service, so services that share one PostgreSQL database keep separate histories.
VERSION_TABLE = version_table("telemetry")  # "telemetry_alembic_version"

MIGRATIONS = ServiceMigrations(
    service="telemetry",
    package=__name__,
    # Any constant works; it only has to be the same for every telemetry replica and the Job.
    lock_key=0x74656C656D,
)
