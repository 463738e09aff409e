"""Alembic migrations of one service, run programmatically against its async database URL.

Every database-owning service keeps its revisions in ``services/<name>/migrations`` (an Alembic
script directory whose ``env.py`` migrates ``config.attributes["connection"]`` and whose
``__init__`` names ``VERSION_TABLE``). This module runs them:

- ``upgrade`` / ``downgrade``: one transaction that first takes a cross-process lock, so replicas
  (and the ``toolmesh migrate`` Job) starting together take turns: PostgreSQL's transaction-level
  advisory lock, or SQLite's write lock (``BEGIN IMMEDIATE``). Both engines run DDL inside a
  transaction, so a failing migration leaves the previous revision in place.
- ``check_schema``: what a service runs at start-up. The database's revision is compared with the
  code's head: a revision the code does not know (the schema is newer than this release, perhaps
  already contracted) refuses to start; a schema behind is migrated when ``migrate_on_start`` is
  true (the default, and what the embedded SQLite dev mode relies on) or refused with the
  ``toolmesh migrate --service <name>`` to run when it is false (production, where the migration
  Job runs before the rollout).

One version table per service (``<service>_alembic_version``), so services may share one
database and keep separate histories.

Alembic (with Mako and Pygments, about 11 MB and a fifth of a second) is imported only when a
schema has to change: the start-up check of a schema already at head reads the revision graph
from the revision files' ``revision``/``down_revision`` assignments and the version table with
plain SQL, so a service started on a migrated database (every start after the first, and every
production start, where the migration Job runs first) never loads it.
"""

from __future__ import annotations

import ast
import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import Column, Connection, MetaData, String, Table, inspect, select, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.kit.db import create_engine
from services.kit.server import StartupRefused

if TYPE_CHECKING:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

T = TypeVar("T")


def version_table(service: str) -> str:
    """The Alembic version table of ``service``; one per service in a shared database."""
    return f"{service}_alembic_version"


class MigrationError(RuntimeError):
    """A migration could not run (unknown target, failing script); the message says why."""


class SchemaMismatch(StartupRefused):
    """The database's schema is not the one this code needs; the message says what to run."""


@dataclass(frozen=True)
class ServiceMigrations:
    """Where a service's revisions live, its version table and its schema lock."""

    service: str
    # The migrations package, e.g. "services.memory.migrations"; its directory is the script
    # location and its VERSION_TABLE (if any) the version table.
    package: str
    # PostgreSQL advisory lock key; the same for every replica of the service.
    lock_key: int
    # Schemas made before the service had migrations (metadata.create_all): when the version
    # table is empty but these tables exist, the database is stamped with this revision first.
    baseline: tuple[str, tuple[str, ...]] | None = None

    @cached_property
    def directory(self) -> Path:
        module = importlib.import_module(self.package)
        assert module.__file__ is not None
        return Path(module.__file__).parent

    @cached_property
    def version_table(self) -> str:
        module = importlib.import_module(self.package)
        return str(getattr(module, "VERSION_TABLE", version_table(self.service)))

    def config(self, connection: Connection | None = None) -> Config:
        from alembic.config import Config

        config = Config()
        config.set_main_option("script_location", str(self.directory))
        if connection is not None:
            config.attributes["connection"] = connection
        return config

    @cached_property
    def script(self) -> ScriptDirectory:
        from alembic.script import ScriptDirectory

        return ScriptDirectory.from_config(self.config())

    @cached_property
    def graph(self) -> dict[str, tuple[str, ...]]:
        """Each revision and the revisions it follows, read from the revision files without
        importing them (they import Alembic); tests check it against Alembic's own graph."""
        return dict(
            _revision_of(path)
            for path in sorted((self.directory / "versions").glob("*.py"))
            if path.name != "__init__.py"
        )

    @property
    def heads(self) -> tuple[str, ...]:
        followed = {down for downs in self.graph.values() for down in downs}
        return tuple(sorted(r for r in self.graph if r not in followed))

    @cached_property
    def known(self) -> frozenset[str]:
        return frozenset(self.graph)

    def revisions(self) -> list[str]:
        """Every revision, oldest first (a linear history is expected)."""
        return [script.revision for script in reversed(list(self.script.walk_revisions()))]


@dataclass(frozen=True)
class SchemaStatus:
    service: str
    # Revisions before and after (empty: no schema yet, or at base).
    before: tuple[str, ...]
    after: tuple[str, ...]
    heads: tuple[str, ...]

    @property
    def changed(self) -> bool:
        return self.before != self.after


def describe(revisions: Sequence[str]) -> str:
    return ",".join(revisions) if revisions else "<none>"


def _revision_of(path: Path) -> tuple[str, tuple[str, ...]]:
    """``revision`` and ``down_revision`` of one revision file (module-level literals, as
    Alembic's template writes them)."""
    found: dict[str, Any] = {}
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target, value = node.target, node.value
        else:
            continue
        if isinstance(target, ast.Name) and target.id in ("revision", "down_revision"):
            found[target.id] = ast.literal_eval(value)
    if not isinstance(found.get("revision"), str):
        raise MigrationError(f'{path}: no literal `revision = "..."` assignment')
    down = found.get("down_revision")
    downs = () if down is None else (down,) if isinstance(down, str) else tuple(down)
    return found["revision"], downs


def current_revisions(connection: Connection, migrations: ServiceMigrations) -> tuple[str, ...]:
    """The revisions in the service's version table (Alembic's ``version_num`` column)."""
    if not inspect(connection).has_table(migrations.version_table):
        return ()
    table = Table(migrations.version_table, MetaData(), Column("version_num", String))
    return tuple(sorted(str(r) for r in connection.execute(select(table.c.version_num)).scalars()))


# --- the locked transaction -----------------------------------------------------------------


async def _locked(
    engine: AsyncEngine,
    migrations: ServiceMigrations,
    work: Callable[[Connection], T],
    *,
    exclusive: bool = True,
) -> T:
    """Run ``work`` in one transaction holding the service's schema lock.

    Exclusive for changes; a check only (``exclusive=False``) shares the lock on PostgreSQL, so
    it waits for a migration in progress instead of reading the schema halfway, and reads
    without any lock on SQLite (WAL readers see the last committed state).
    """
    async with engine.begin() as conn:
        await _take_lock(conn, migrations, exclusive=exclusive)
        return await conn.run_sync(work)


async def _take_lock(
    conn: AsyncConnection, migrations: ServiceMigrations, *, exclusive: bool
) -> None:
    if conn.dialect.name == "sqlite":
        if exclusive:
            await conn.exec_driver_sql("BEGIN IMMEDIATE")
        return
    lock = "pg_advisory_xact_lock" if exclusive else "pg_advisory_xact_lock_shared"
    await conn.execute(text(f"SELECT {lock}(:key)"), {"key": migrations.lock_key})


async def _with_engine(url_or_engine: str | AsyncEngine, use: Callable[[AsyncEngine], Any]) -> Any:
    if isinstance(url_or_engine, AsyncEngine):
        return await use(url_or_engine)
    engine = create_engine(url_or_engine, pool_size=1)
    try:
        return await use(engine)
    finally:
        await engine.dispose()


# --- steps run inside the transaction -------------------------------------------------------


def _unknown_message(migrations: ServiceMigrations, current: Sequence[str]) -> str:
    heads = describe(migrations.heads)
    return (
        f"{migrations.service}: the database schema is at revision {describe(current)}, which this "
        f"release does not know (its newest revision is {heads}): the schema belongs to a newer "
        f"release and may already be contracted. Run the release that migrated it, or roll the "
        f"schema back with that newer release's `toolmesh migrate --service "
        f"{migrations.service} --downgrade {heads}` first"
    )


def _adopt_baseline(connection: Connection, migrations: ServiceMigrations) -> None:
    """Stamp a pre-migrations schema (made by create_all) with the baseline revision."""
    if migrations.baseline is None:
        return
    revision, tables = migrations.baseline
    existing = set(inspect(connection).get_table_names())
    present = [t for t in tables if t in existing]
    if not present:
        return
    if len(present) != len(tables):
        missing = sorted(set(tables) - existing)
        raise MigrationError(
            f"{migrations.service}: the database has some of the tables of revision {revision} but "
            f"not {', '.join(missing)} and no {migrations.version_table}: repair it by hand"
        )
    from alembic import command

    command.stamp(migrations.config(connection), revision)


def _upgrade(connection: Connection, migrations: ServiceMigrations, target: str) -> SchemaStatus:
    before = current_revisions(connection, migrations)
    unknown = [r for r in before if r not in migrations.known]
    if unknown:
        raise SchemaMismatch(_unknown_message(migrations, before))
    if not before:
        _adopt_baseline(connection, migrations)
    from alembic import command

    _run(lambda: command.upgrade(migrations.config(connection), target), migrations)
    return SchemaStatus(
        migrations.service, before, current_revisions(connection, migrations), migrations.heads
    )


def _downgrade(connection: Connection, migrations: ServiceMigrations, target: str) -> SchemaStatus:
    before = current_revisions(connection, migrations)
    unknown = [r for r in before if r not in migrations.known]
    if unknown:
        raise SchemaMismatch(_unknown_message(migrations, before))
    from alembic import command

    _run(lambda: command.downgrade(migrations.config(connection), target), migrations)
    return SchemaStatus(
        migrations.service, before, current_revisions(connection, migrations), migrations.heads
    )


def _run(step: Callable[[], None], migrations: ServiceMigrations) -> None:
    from alembic.util import CommandError

    try:
        step()
    except CommandError as error:
        raise MigrationError(f"{migrations.service}: {error}") from error


def _check(
    connection: Connection, migrations: ServiceMigrations, migrate_on_start: bool
) -> SchemaStatus:
    current = current_revisions(connection, migrations)
    heads = migrations.heads
    if current == heads:
        return SchemaStatus(migrations.service, current, current, heads)
    if any(r not in migrations.known for r in current):
        raise SchemaMismatch(_unknown_message(migrations, current))
    if migrate_on_start:
        return _upgrade(connection, migrations, "heads")
    name = migrations.service
    raise SchemaMismatch(
        f"{name}: the database schema is at revision {describe(current)} but this release needs "
        f"{describe(heads)}: run `toolmesh migrate --service {name}` (the migration Job) with "
        f"the same database settings first, or set TOOLMESH_{name.upper()}_MIGRATE_ON_START=true "
        f"to migrate at start-up"
    )


# --- the API --------------------------------------------------------------------------------


async def current(
    url_or_engine: str | AsyncEngine, migrations: ServiceMigrations
) -> tuple[str, ...]:
    """The database's revisions (empty when it has none)."""

    async def use(engine: AsyncEngine) -> tuple[str, ...]:
        async with engine.connect() as conn:
            return await conn.run_sync(lambda sync: current_revisions(sync, migrations))

    result: tuple[str, ...] = await _with_engine(url_or_engine, use)
    return result


async def upgrade(
    url_or_engine: str | AsyncEngine, migrations: ServiceMigrations, target: str = "heads"
) -> SchemaStatus:
    """Upgrade to ``target`` (default the head) under the schema lock."""

    async def use(engine: AsyncEngine) -> SchemaStatus:
        return await _locked(engine, migrations, lambda c: _upgrade(c, migrations, target))

    result: SchemaStatus = await _with_engine(url_or_engine, use)
    return result


async def downgrade(
    url_or_engine: str | AsyncEngine, migrations: ServiceMigrations, target: str
) -> SchemaStatus:
    """Downgrade to ``target`` ("base" drops everything) under the schema lock."""

    async def use(engine: AsyncEngine) -> SchemaStatus:
        return await _locked(engine, migrations, lambda c: _downgrade(c, migrations, target))

    result: SchemaStatus = await _with_engine(url_or_engine, use)
    return result


async def check_schema(
    url_or_engine: str | AsyncEngine,
    migrations: ServiceMigrations,
    *,
    migrate_on_start: bool = True,
) -> SchemaStatus:
    """Start-up check: at head, or migrated to it, or SchemaMismatch saying what to run."""

    async def use(engine: AsyncEngine) -> SchemaStatus:
        return await _locked(
            engine,
            migrations,
            lambda c: _check(c, migrations, migrate_on_start),
            exclusive=migrate_on_start,
        )

    result: SchemaStatus = await _with_engine(url_or_engine, use)
    return result
