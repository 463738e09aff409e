"""Databases for the migration tests: a SQLite file in a temp dir, or a fresh PostgreSQL database.

PostgreSQL databases are made per test (``toolmesh_test_mig_<random>``) and dropped afterwards;
the PostgreSQL cases skip when the server is unreachable, except in CI (CI=true), where they fail.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import MetaData

import services
from gateway.migrations import METADATA as GATEWAY_METADATA
from gateway.migrations import MIGRATIONS as GATEWAY
from services.auth.migrations import MIGRATIONS as AUTH
from services.auth.models import Base as AuthBase
from services.kit.db import sqlite_url
from services.kit.migrations import ServiceMigrations
from services.memory.migrations import MIGRATIONS as MEMORY
from services.memory.store import Base as MemoryBase
from services.router.backends.store import Base as RouterBase
from services.router.migrations import MIGRATIONS as ROUTER

ROOT = Path(services.__file__).resolve().parents[1]


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
    "gateway": Service(GATEWAY, GATEWAY_METADATA),
}


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """One empty database for the test, on each backend."""
    if request.param == "postgres":
        url: str = request.getfixturevalue("postgres_url")
        return url
    return sqlite_url(tmp_path, "mig")
