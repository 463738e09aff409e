"""Fixtures every test directory shares."""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator

import argon2
import pytest
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.auth import credentials
from services.kit import logs as kit_logs
from services.kit.logs import NOISY_LOGGERS
from tests.pgutil import fresh_databases

# One meter provider for the whole test session, installed before any test runs: the services'
# instruments live on the global meter (services.kit.metrics), and OpenTelemetry lets the global
# provider be set once, so a test that installed its own would decide for every later test.
_METRICS = InMemoryMetricReader()
metrics.set_meter_provider(MeterProvider(metric_readers=[_METRICS]))

# Likewise one tracer provider, recording as a service process does (configure_tracing installs
# an SDK provider there too), so no test runs against the no-op default and none can change
# what the next one sees. Its spans are kept in memory and forgotten after each test.
_SPANS = InMemorySpanExporter()
_TRACER_PROVIDER = TracerProvider()
_TRACER_PROVIDER.add_span_processor(SimpleSpanProcessor(_SPANS))
trace.set_tracer_provider(_TRACER_PROVIDER)


# argon2id as auth runs it in-process in the tests, at a cost of milliseconds instead of about
# a tenth of a second of CPU per hash (every auth start hashes a decoy and the dev client, every
# token issued verifies one). The algorithm, the encoding and every code path are the real ones;
# only the work factor is lower. Auth as a process (tests/e2e, tests/faults, tests/scale) keeps
# the production cost, and tests/unit/auth/test_hash_cost.py checks that cost.
CHEAP_ARGON2 = functools.partial(
    argon2.PasswordHasher, time_cost=1, memory_cost=8 * 1024, parallelism=1
)


@pytest.fixture(autouse=True, scope="session")
def _cheap_secret_hashing() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(credentials, "PasswordHasher", CHEAP_ARGON2)
        yield


@pytest.fixture(scope="session")
def metric_reader() -> InMemoryMetricReader:
    """The session's in-memory metrics (cumulative: compare before and after, or look for the
    labels a test made)."""
    return _METRICS


@pytest.fixture
def spans() -> InMemorySpanExporter:
    """The spans finished during this test by anything using the global tracer provider."""
    return _SPANS


@pytest.fixture(autouse=True)
def _spans_forgotten() -> Iterator[None]:
    _SPANS.clear()
    yield
    _SPANS.clear()


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


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    """Tests run in a random order (pytest-randomly); the seed closes the report, even under -q,
    so that a failure seen once can be replayed in the same order."""
    seed = getattr(config.option, "randomly_seed", None)
    if isinstance(seed, int) and config.pluginmanager.has_plugin("randomly"):
        terminalreporter.write_line(
            f"random order seed {seed}: replay this order with --randomly-seed={seed}"
        )
