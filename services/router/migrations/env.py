"""Alembic environment: migrates the connection services.kit.migrations hands over."""

from alembic import context

from services.router import audit  # noqa: F401  (its outbox tables join Base.metadata)
from services.router.backends.store import Base
from services.router.migrations import VERSION_TABLE
from services.router.models import prompts  # noqa: F401  (its tables join Base.metadata)
from services.router.releases import store  # noqa: F401  (its tables join Base.metadata)

context.configure(
    connection=context.config.attributes["connection"],
    target_metadata=Base.metadata,
    version_table=VERSION_TABLE,
    # SQLite cannot ALTER most things; batch mode rebuilds the table instead.
    render_as_batch=True,
)
with context.begin_transaction():
    context.run_migrations()
