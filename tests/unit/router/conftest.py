"""Fixtures: a router on SQLite in a temp dir, and a fresh PostgreSQL database."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.unit.router.harness import RouterServer, router_settings, start_router


@pytest.fixture
async def router(tmp_path: Path) -> AsyncIterator[RouterServer]:
    async for server in start_router(router_settings(tmp_path)):
        yield server
