"""Alembic environment: migrates the connection that upgrade_to_head hands over."""

from alembic import context

# Importing the modules registers their tables on Base.metadata.
from services.telemetry import audit, ledger, store  # noqa: F401
from services.telemetry.database import Base
from services.telemetry.migrations import VERSION_TABLE

context.configure(
    connection=context.config.attributes["connection"],
    target_metadata=Base.metadata,
    version_table=VERSION_TABLE,
    # SQLite cannot ALTER most things; batch mode rebuilds the table instead.
    render_as_batch=True,
)
with context.begin_transaction():
    context.run_migrations()
