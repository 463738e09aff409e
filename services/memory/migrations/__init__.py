"""Alembic migrations of the memory schema, applied at start-up by every replica.

A schema change is a new file in versions/ whose down_revision is the latest one;
test_migrations_match_the_models fails until the migrations and the models agree.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection

# Per service, so services that share one PostgreSQL database keep separate histories.
VERSION_TABLE = "memory_alembic_version"


def upgrade_to_head(connection: Connection) -> None:
    """Apply every missing revision on ``connection``, inside its open transaction."""
    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent))
    config.attributes["connection"] = connection
    command.upgrade(config, "head")
