"""Fresh PostgreSQL databases for tests; skipped outside CI when PostgreSQL is not reachable."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest
from sqlalchemy.engine import make_url

ADMIN_URL = os.environ.get("TOOLMESH_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def _admin_conninfo() -> str:
    return make_url(ADMIN_URL).set(drivername="postgresql").render_as_string(hide_password=False)


def require_postgres() -> None:
    """Skip when PostgreSQL is unreachable, except in CI where that is a failure."""
    try:
        with psycopg.connect(_admin_conninfo(), connect_timeout=3):
            return
    except psycopg.OperationalError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL must be reachable in CI ({ADMIN_URL}): {exc}")
        pytest.skip(f"PostgreSQL not reachable at {ADMIN_URL}")


@contextmanager
def fresh_databases(*names: str) -> Iterator[dict[str, str]]:
    """Create one empty database per name; yield name -> URL; drop them afterwards."""
    require_postgres()
    run = uuid.uuid4().hex[:8]
    created: dict[str, str] = {}
    base = make_url(ADMIN_URL)
    with psycopg.connect(_admin_conninfo(), autocommit=True) as conn:
        for name in names:
            db = f"tm_{name}_{run}"
            conn.execute(f'CREATE DATABASE "{db}"')
            created[name] = base.set(database=db).render_as_string(hide_password=False)
    try:
        yield created
    finally:
        with psycopg.connect(_admin_conninfo(), autocommit=True) as conn:
            for url in created.values():
                conn.execute(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)')
