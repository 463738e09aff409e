"""``toolmesh migrate --service <name>``: a service's schema migrations, run as their own step.

This is what the Kubernetes migration Jobs run before a rollout (docs/deploy.md,
docs/migrations.md). The database is found as the service finds it: ``--database-url``, else the
service's settings from the environment (TOOLMESH_<SERVICE>_DATABASE_URL, falling back to
TOOLMESH_DATABASE_URL, else the SQLite file ``<TOOLMESH_DATA_DIR>/<service>.db``; for the gateway,
whose only tables are its outbox's, TOOLMESH_GATEWAY_OUTBOX_URL).

The CLI is an operator tool, not a service: from each service it imports only its migrations
package (``services.<name>.migrations``: the revisions, whose env.py loads the table models) and
its settings class, never its servers or stores. Imports are deferred to ``run`` so the other
``toolmesh`` commands do not pay for Alembic.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from services.kit.migrations import ServiceMigrations

SERVICES = ("auth", "router", "memory", "telemetry", "gateway")


def add_parser(sub: Any) -> None:
    migrate = sub.add_parser(
        "migrate",
        help="migrate a service's database schema (the migration Job's step)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    migrate.add_argument("--service", required=True, choices=SERVICES)
    migrate.add_argument(
        "--database-url",
        default="",
        help="database URL (default: the service's settings from the environment)",
    )
    action = migrate.add_mutually_exclusive_group()
    action.add_argument("--to", default="", metavar="REV", help="upgrade to REV (default: head)")
    action.add_argument(
        "--downgrade", default="", metavar="REV", help="downgrade to REV ('base': empty)"
    )
    action.add_argument(
        "--show", action="store_true", help="print the current and head revisions; change nothing"
    )


class MigrateError(Exception):
    """Printed as ``error: <message>``; exit status 1."""


class DatabaseSettings(Protocol):
    """What every service's settings class offers for finding its database."""

    def ensure_data_dir(self) -> Path: ...


def service_parts(service: str) -> tuple[ServiceMigrations, Callable[[], DatabaseSettings]]:
    """The service's migrations and settings class: all the CLI imports of a service. The
    imports are written out (not computed) so the import contracts in pyproject.toml see them."""
    if service == "auth":
        from services.auth.migrations import MIGRATIONS as AUTH
        from services.auth.settings import AuthSettings

        return AUTH, AuthSettings
    if service == "router":
        from services.router.migrations import MIGRATIONS as ROUTER
        from services.router.settings import RouterSettings

        return ROUTER, RouterSettings
    if service == "memory":
        from services.memory.migrations import MIGRATIONS as MEMORY
        from services.memory.settings import MemorySettings

        return MEMORY, MemorySettings
    if service == "telemetry":
        from services.telemetry.migrations import MIGRATIONS as TELEMETRY
        from services.telemetry.settings import TelemetrySettings

        return TELEMETRY, TelemetrySettings
    if service == "gateway":
        # The gateway's only tables are its outbox (TOOLMESH_GATEWAY_OUTBOX_URL).
        from gateway.migrations import MIGRATIONS as GATEWAY
        from gateway.settings import GatewaySettings

        return GATEWAY, GatewaySettings
    raise MigrateError(f"unknown service {service!r} (one of {', '.join(SERVICES)})")


def migrations_of(service: str) -> ServiceMigrations:
    """The service's ServiceMigrations, from its migrations package."""
    return service_parts(service)[0]


def database_url(service: str, explicit: str) -> str:
    """The URL the service itself would use, read from the environment by its settings class."""
    if explicit:
        return explicit
    from pydantic import ValidationError

    from services.kit.db import sqlite_url

    settings_class = service_parts(service)[1]
    try:
        settings = settings_class()
    except ValidationError as error:
        raise MigrateError(f"{service} settings are invalid: {error}") from None
    # The gateway has no database but its outbox's.
    configured = getattr(settings, "outbox_url" if service == "gateway" else "database_url")
    url: str = configured or sqlite_url(settings.ensure_data_dir(), service)
    return url


def _safe(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


async def _migrate(args: argparse.Namespace, out: Any) -> None:
    from services.kit import migrations as kit

    service: str = args.service
    migrations = migrations_of(service)
    url = database_url(service, args.database_url)
    heads = kit.describe(migrations.heads)
    print(f"{service}: database {_safe(url)} (version table {migrations.version_table})", file=out)
    before = await kit.current(url, migrations)
    unknown = [r for r in before if r not in migrations.known]
    if args.show:
        state = (
            "newer than this release (unknown revision)"
            if unknown
            else "up to date"
            if before == migrations.heads
            else f"behind: run `toolmesh migrate --service {service}`"
        )
        print(f"{service}: current {kit.describe(before)}, head {heads}: {state}", file=out)
        return
    if args.downgrade:
        print(f"{service}: current {kit.describe(before)}, target {args.downgrade}", file=out)
        status = await kit.downgrade(url, migrations, args.downgrade)
    else:
        target = args.to or "heads"
        shown = args.to or f"{heads} (head)"
        print(f"{service}: current {kit.describe(before)}, target {shown}", file=out)
        status = await kit.upgrade(url, migrations, target)
    verb = "now at" if status.changed else "already at"
    print(f"{service}: {verb} {kit.describe(status.after)}", file=out)


def run(args: argparse.Namespace) -> int:
    """Run the command; 0 when the schema is where it was asked to be, 1 with a message if not."""
    from sqlalchemy.exc import SQLAlchemyError

    from services.kit.migrations import MigrationError, SchemaMismatch

    # Alembic reports each revision it runs on its logger; show those steps (and no chatter).
    steps = logging.StreamHandler(sys.stderr)
    steps.addFilter(lambda record: record.getMessage().startswith("Running "))
    alembic_log = logging.getLogger("alembic")
    alembic_log.setLevel(logging.INFO)
    alembic_log.addHandler(steps)
    try:
        asyncio.run(_migrate(args, sys.stdout))
    except (MigrateError, MigrationError, SchemaMismatch) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except (SQLAlchemyError, OSError, ValueError) as error:
        print(
            f"error: {args.service}: migration failed: {type(error).__name__}: {error}",
            file=sys.stderr,
        )
        return 1
    return 0
