"""Alembic migrations of the gateway's only tables: its durable outbox in PostgreSQL.

The gateway keeps no other state. In production its outbox is a table of its own database
(TOOLMESH_GATEWAY_OUTBOX_URL), so a pod that is scaled down or drained during a memory or
telemetry outage leaves its acknowledged items for the next replica to deliver (docs/deploy.md).
Without that setting the outbox is a local SQLite file and these migrations are not used.

This module stays light: `toolmesh migrate` imports it (and only it) from the gateway.
"""

from __future__ import annotations

from sqlalchemy import MetaData

from services.kit.migrations import ServiceMigrations, version_table
from services.kit.outbox_table import outbox_tables

VERSION_TABLE = version_table("gateway")  # "gateway_alembic_version"
PREFIX = "gateway"

METADATA = MetaData()
TABLES = outbox_tables(METADATA, PREFIX)

MIGRATIONS = ServiceMigrations(
    service="gateway",
    package=__name__,
    lock_key=0x746D67617465,  # "tmgate"
)
