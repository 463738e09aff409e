"""Fixtures: a router on SQLite in a temp dir, and a fresh PostgreSQL database."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
import pytest

from tests.unit.router.harness import RouterServer, router_settings, start_router

PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=test connect_timeout=3"


@pytest.fixture
async def router(tmp_path: Path) -> AsyncIterator[RouterServer]:
    async for server in start_router(router_settings(tmp_path)):
        yield server


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh database toolmesh_test_router_<random>, dropped afterwards."""
    try:
        admin = psycopg.connect(PG_ADMIN, autocommit=True)
    except psycopg.OperationalError as exc:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(f"PostgreSQL unreachable: {exc}")
    name = f"toolmesh_test_router_{uuid.uuid4().hex[:12]}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield f"postgresql://postgres@127.0.0.1:5432/{name}"
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
