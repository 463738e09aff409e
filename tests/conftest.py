"""Fixtures every test directory shares."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from services.kit import logs as kit_logs
from services.kit.logs import NOISY_LOGGERS
from tests.pgutil import fresh_databases


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database, dropped afterwards (skipped outside CI when unreachable)."""
    with fresh_databases("test") as urls:
        yield urls["test"]


@pytest.fixture(autouse=True)
def _process_logging_restored() -> Iterator[None]:
    """A test that configures logging the way a service process does (root handler, levels,
    the redacting record factory) must not change how the next test's records look."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    levels = {name: logging.getLogger(name).level for name in NOISY_LOGGERS}
    factory = logging.getLogRecordFactory()
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, saved in levels.items():
        logging.getLogger(name).setLevel(saved)
    if logging.getLogRecordFactory() is not factory:
        logging.setLogRecordFactory(factory)
        kit_logs.forget_redaction_factory()
