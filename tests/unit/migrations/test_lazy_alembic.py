"""The start-up check reads the revision graph without Alembic, and agrees with Alembic."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from services.kit.migrations import ServiceMigrations
from services.telemetry.migrations import MIGRATIONS as TELEMETRY
from testing.mesh import REPO
from tests.unit.migrations.conftest import SERVICES

ALL = {name: service.migrations for name, service in SERVICES.items()} | {"telemetry": TELEMETRY}


@pytest.mark.parametrize("name", sorted(ALL))
def test_the_graph_read_from_the_files_is_alembics(name: str) -> None:
    migrations: ServiceMigrations = ALL[name]
    script = migrations.script
    assert migrations.heads == tuple(sorted(script.get_heads()))
    assert migrations.known == {s.revision for s in script.walk_revisions()}
    assert migrations.graph == {
        s.revision: tuple(s._versioned_down_revisions) for s in script.walk_revisions()
    }


CHECK = """
import asyncio, sys
from pathlib import Path
from services.kit.db import sqlite_url
from services.kit.migrations import check_schema
from services.memory.migrations import MIGRATIONS
status = asyncio.run(check_schema(sqlite_url(Path(sys.argv[1]), "memory"), MIGRATIONS))
print(status.changed, "alembic" in sys.modules, "mako" in sys.modules)
"""


def test_a_schema_at_head_is_checked_without_loading_alembic(tmp_path: Path) -> None:
    def check() -> str:
        return subprocess.run(
            [sys.executable, "-c", CHECK, str(tmp_path)],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()

    assert check() == "True True True"  # a fresh database: migrated, with Alembic
    assert check() == "False False False"  # at head: Alembic never imported
