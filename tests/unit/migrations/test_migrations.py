"""Every migration of auth, router, memory and the gateway (its outbox), up and down, on SQLite
and PostgreSQL.

Also: the models match the migrations (autogenerate finds nothing), services share one database
with one version table each, replicas migrating together take turns, databases made by the
create_all era are adopted, and check_schema's three answers (at head, behind, unknown).
"""

from __future__ import annotations

import asyncio

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection, inspect, text

from services.kit import migrations as kit
from services.kit.db import create_engine
from services.kit.migrations import MigrationError, SchemaMismatch
from tests.unit.migrations.conftest import SERVICES, Service

NAMES = sorted(SERVICES)


async def tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            return set(await conn.run_sync(lambda sync: inspect(sync).get_table_names()))
    finally:
        await engine.dispose()


async def model_diff(url: str, service: Service, *, shared: bool = False) -> list[object]:
    """What autogenerate would change; ``shared``: ignore other services' tables."""
    own = {*service.metadata.tables, service.migrations.version_table}

    def compare(sync: Connection) -> list[object]:
        opts: dict[str, object] = {"version_table": service.migrations.version_table}
        if shared:
            opts["include_name"] = lambda name, kind, _parent: kind != "table" or name in own
        context = MigrationContext.configure(sync, opts=opts)
        return list(compare_metadata(context, service.metadata))

    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(compare)
    finally:
        await engine.dispose()


async def stamp(url: str, service: Service, revision: str) -> None:
    """Make the database look migrated by a release whose newest revision is ``revision``."""
    engine = create_engine(url)
    table = service.migrations.version_table
    try:
        async with engine.begin() as conn:
            await conn.execute(text(f"UPDATE {table} SET version_num = :rev"), {"rev": revision})
    finally:
        await engine.dispose()


@pytest.mark.parametrize("name", NAMES)
async def test_every_migration_up_down_and_up_again(database_url: str, name: str) -> None:
    service = SERVICES[name]
    migrations = service.migrations
    revisions = migrations.revisions()
    assert revisions, f"{name} has no migrations"
    model_tables = set(service.metadata.tables)

    for revision in revisions:  # one step at a time, so each upgrade() runs on its own
        status = await kit.upgrade(database_url, migrations, revision)
        assert status.after == (revision,)
    assert await kit.current(database_url, migrations) == migrations.heads
    assert model_tables <= await tables(database_url)

    for previous in [*reversed(revisions[:-1]), "base"]:  # each downgrade() on its own
        status = await kit.downgrade(database_url, migrations, previous)
        assert status.after == (() if previous == "base" else (previous,))
    assert await tables(database_url) <= {migrations.version_table}

    status = await kit.upgrade(database_url, migrations)
    assert status.before == () and status.after == migrations.heads
    assert await model_diff(database_url, service) == []


@pytest.mark.parametrize("name", NAMES)
async def test_migrations_match_the_models(database_url: str, name: str) -> None:
    service = SERVICES[name]
    await kit.check_schema(database_url, service.migrations, migrate_on_start=True)
    assert await model_diff(database_url, service) == []


async def test_services_share_one_database_with_a_version_table_each(database_url: str) -> None:
    for service in SERVICES.values():
        await kit.upgrade(database_url, service.migrations)
    present = await tables(database_url)
    for service in SERVICES.values():
        assert service.migrations.version_table in present
        assert set(service.metadata.tables) <= present

    await kit.downgrade(database_url, SERVICES["router"].migrations, "base")
    assert await kit.current(database_url, SERVICES["router"].migrations) == ()
    for name in ("auth", "memory"):
        migrations = SERVICES[name].migrations
        assert await kit.current(database_url, migrations) == migrations.heads
        assert await model_diff(database_url, SERVICES[name], shared=True) == []


async def test_replicas_migrating_together_take_turns(database_url: str) -> None:
    migrations = SERVICES["auth"].migrations
    if database_url.startswith("sqlite"):
        # A fresh SQLite file switches to WAL on first connect; let one connection do that.
        await kit.current(database_url, migrations)
    results = await asyncio.gather(
        *(kit.check_schema(database_url, migrations, migrate_on_start=True) for _ in range(4))
    )
    assert sum(status.changed for status in results) == 1  # the others found nothing to do
    assert all(status.after == migrations.heads for status in results)


async def test_check_schema_at_head_behind_and_unknown(database_url: str) -> None:
    service = SERVICES["router"]
    migrations = service.migrations
    with pytest.raises(SchemaMismatch, match=r"toolmesh migrate --service router"):
        await kit.check_schema(database_url, migrations, migrate_on_start=False)
    assert await kit.current(database_url, migrations) == ()  # a refusal changes nothing

    migrated = await kit.check_schema(database_url, migrations, migrate_on_start=True)
    assert migrated.changed and migrated.after == migrations.heads
    at_head = await kit.check_schema(database_url, migrations, migrate_on_start=False)
    assert not at_head.changed

    await stamp(database_url, service, "ffffffffffff")
    for migrate in (True, False):
        with pytest.raises(SchemaMismatch, match=r"ffffffffffff.*does not know"):
            await kit.check_schema(database_url, migrations, migrate_on_start=migrate)
    with pytest.raises(SchemaMismatch, match="does not know"):
        await kit.upgrade(database_url, migrations)
    assert await kit.current(database_url, migrations) == ("ffffffffffff",)


async def test_an_unknown_target_is_a_migration_error(database_url: str) -> None:
    with pytest.raises(MigrationError, match="zzz"):
        await kit.upgrade(database_url, SERVICES["memory"].migrations, "zzz")


@pytest.mark.parametrize("name", ["auth", "router"])
async def test_a_create_all_database_is_adopted_with_its_data(database_url: str, name: str) -> None:
    """The previous release made these tables with create_all and kept no version table."""
    service = SERVICES[name]
    assert service.migrations.baseline is not None
    baseline, baseline_tables = service.migrations.baseline
    # Exactly the baseline revision's tables (what create_all made then), no version table.
    await kit.upgrade(database_url, service.migrations, baseline)
    engine = create_engine(database_url)
    table = baseline_tables[0]
    try:
        async with engine.begin() as conn:
            await conn.execute(text(f"DROP TABLE {service.migrations.version_table}"))
            count = (await conn.execute(text(f"SELECT count(*) FROM {table}"))).scalar_one()
        assert count == 0
        status = await kit.check_schema(engine, service.migrations, migrate_on_start=True)
        assert status.before == () and status.after == service.migrations.heads
    finally:
        await engine.dispose()
    assert await model_diff(database_url, service) == []


async def test_telemetry_revisions_run_through_the_kit_as_toolmesh_migrate_runs_them(
    database_url: str,
) -> None:
    """Telemetry still migrates in its own start-up path; the kit helper is its drop-in."""
    from cli.migrate import migrations_of

    migrations = migrations_of("telemetry")
    assert migrations.version_table == "telemetry_alembic_version"
    status = await kit.check_schema(database_url, migrations, migrate_on_start=True)
    assert status.after == migrations.heads
    await kit.downgrade(database_url, migrations, "base")
    assert await tables(database_url) <= {migrations.version_table}
    assert (await kit.upgrade(database_url, migrations)).after == migrations.heads
