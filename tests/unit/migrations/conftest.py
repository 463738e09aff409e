"""Databases for the migration tests: a SQLite file in a temp dir, or a fresh PostgreSQL database.

PostgreSQL databases are made per test (``toolmesh_test_mig_<random>``) and dropped afterwards;
the PostgreSQL cases skip when the server is unreachable, except in CI (CI=true), where they fail.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import MetaData

import services
from services.auth.migrations import MIGRATIONS as AUTH
from services.auth.models import Base as AuthBase
from services.kit.db import sqlite_url
from services.kit.migrations import ServiceMigrations
from services.memory.migrations import MIGRATIONS as MEMORY
from services.memory.store import Base as MemoryBase
from services.router.migrations import MIGRATIONS as ROUTER
from services.router.notes import Base as RouterBase

ROOT = Path(services.__file__).resolve().parents[1]
PG_HOST = os.environ.get("TOOLMESH_TEST_PG_HOST", "127.0.0.1")
PG_ADMIN = f"host={PG_HOST} port=5432 user=postgres dbname=postgres connect_timeout=3"


@dataclass(frozen=True)
class Service:
    migrations: ServiceMigrations
    metadata: MetaData

    @property
    def name(self) -> str:
        return self.migrations.service


SERVICES = {
    "auth": Service(AUTH, AuthBase.metadata),
    "router": Service(ROUTER, RouterBase.metadata),
    "memory": Service(MEMORY, MemoryBase.metadata),
}


@pytest.fixture
def postgres_url() -> Iterator[str]:
    try:
        admin = psycopg.connect(PG_ADMIN, autocommit=True)
    except psycopg.OperationalError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL must be reachable in CI: {exc}")
        pytest.skip(f"PostgreSQL unreachable: {exc}")
    name = f"toolmesh_test_mig_{uuid.uuid4().hex[:12]}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield f"postgresql://postgres@{PG_HOST}:5432/{name}"
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """One empty database for the test, on each backend."""
    if request.param == "postgres":
        url: str = request.getfixturevalue("postgres_url")
        return url
    return sqlite_url(tmp_path, "mig")
