"""Fixtures every test directory shares."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.pgutil import fresh_databases


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database, dropped afterwards (skipped outside CI when unreachable)."""
    with fresh_databases("test") as urls:
        yield urls["test"]
