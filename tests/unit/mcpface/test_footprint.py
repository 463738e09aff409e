"""The MCP face keeps no database, so it loads no database library (issue 14: idle memory)."""

from __future__ import annotations

import subprocess
import sys

from testing.mesh import REPO

LOADED = "import sys, mcpface.app; print(sorted({m.split('.')[0] for m in sys.modules}))"


def test_the_face_loads_neither_sqlalchemy_nor_a_database_driver() -> None:
    loaded = subprocess.run(
        [sys.executable, "-c", LOADED], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    assert "'mcp'" in loaded  # what the face is made of, so the listing is real
    for library in ("sqlalchemy", "aiosqlite", "psycopg", "alembic"):
        assert f"'{library}'" not in loaded
