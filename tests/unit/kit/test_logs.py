"""Redaction of every log record, and the rate limit for lines a caller can cause."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
)

from services.kit import logs
from services.kit.logs import (
    REDACTED,
    LogLimiter,
    configure_logging,
    install_redaction,
    redact,
)

TOKEN = (
    "eyJhbGciOiJFZERTQSIsImtpZCI6ImsxIn0"
    ".eyJzdWIiOiJjbGllbnQtMSIsInRlbmFudCI6ImEifQ"
    ".c2lnbmF0dXJlLWJ5dGVz"
)
# What grpc's own logger printed for an authorization header with a non-UTF-8 byte.
GRPC_LINE = f"Invalid encoding on b'Bearer {TOKEN}\\xffTAIL'"
# A key made for this run, never one committed to the repository.
PEM = (
    Ed25519PrivateKey.generate()
    .private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    .decode()
    .strip()
)
PEM_BODY = PEM.splitlines()[1]


def test_a_private_key_is_redacted_whole_or_cut_off() -> None:
    # Not parametrized: the key is new each run, and parameter ids must be the same in every
    # pytest-xdist worker.
    for text, secret in (
        (f"key file:\n{PEM}\nend", PEM_BODY),
        (f"{PEM.splitlines()[0]}\n{PEM_BODY[:12]} (cut off", PEM_BODY[:12]),
    ):
        redacted = redact(text)
        assert secret not in redacted
        assert REDACTED in redacted


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        (GRPC_LINE, TOKEN),
        (GRPC_LINE, "TAIL"),
        (f"authorization: Bearer {TOKEN}", TOKEN),
        (f"token {TOKEN} expired", TOKEN),
        ("Basic dXNlcjpodW50ZXIy", "dXNlcjpodW50ZXIy"),
        ("client_secret=s3cr3t-value&x=1", "s3cr3t-value"),
        ('{"client_secret": "s3cr3t-value"}', "s3cr3t-value"),
        ("api_key = 'k-123456'", "k-123456"),
        ("PASSWORD=hunter2", "hunter2"),
        ("postgresql://toolmesh:hunter2@db:5432/auth", "hunter2"),
    ],
)
def test_secrets_are_redacted(text: str, secret: str) -> None:
    redacted = redact(text)
    assert secret not in redacted
    assert REDACTED in redacted


@pytest.mark.parametrize(
    "text",
    [
        "access_token: must not be empty",
        "session_id: 1-128 characters of A-Z a-z 0-9 . _ : -",
        "what is 17 * 23",
        "token_ttl_s=900",
        "created dev signing key",
    ],
)
def test_ordinary_text_is_left_alone(text: str) -> None:
    assert redact(text) == text


@pytest.fixture
def json_stream(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """The kit's own handler, writing to a buffer instead of stderr, with a fresh limiter (other
    tests may have spent the process's)."""
    monkeypatch.setattr(logs, "LIMITER", LogLimiter())
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    configure_logging("test", "DEBUG")
    (handler,) = root.handlers
    assert isinstance(handler, logging.StreamHandler)
    buffer = io.StringIO()
    handler.setStream(buffer)
    try:
        yield buffer
    finally:
        root.handlers[:], root.level = saved, level


def _lines(buffer: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


def test_grpc_logger_lines_are_redacted_and_quiet(json_stream: io.StringIO) -> None:
    """grpc's own logger, at ERROR with a traceback holding the value: one redacted INFO line."""
    try:
        b"\xff".decode()
    except UnicodeDecodeError:
        logging.getLogger("grpc._cython.cygrpc").exception(GRPC_LINE)
    (line,) = _lines(json_stream)
    text = json.dumps(line)
    assert TOKEN not in text and "TAIL" not in text
    assert line["level"] == "INFO" and "exc_info" not in line


def test_message_args_exception_and_extra_are_redacted(json_stream: io.StringIO) -> None:
    log = logging.getLogger("toolmesh.test")
    try:
        raise ValueError(f"bad header Bearer {TOKEN}")
    except ValueError:
        log.exception(
            "call from %s failed",
            f"client with client_secret={TOKEN}",
            extra={"header": f"Bearer {TOKEN}", "nested": {"items": [TOKEN]}, "count": 3},
        )
    (line,) = _lines(json_stream)
    assert TOKEN not in json.dumps(line)
    assert "ValueError: bad header Bearer [REDACTED]" in str(line["exc_info"])
    assert line["header"] == f"Bearer {REDACTED}" and line["count"] == 3
    assert line["nested"] == {"items": [REDACTED]}


def test_a_handler_added_later_gets_redacted_records() -> None:
    """The record factory redacts at creation, whatever handler writes the record."""
    install_redaction()
    buffer = io.StringIO()
    later = logging.StreamHandler(buffer)
    logger = logging.getLogger("some.library")
    logger.addHandler(later)
    logger.propagate = False
    try:
        logger.warning("sending Authorization: Bearer %s", TOKEN)
    finally:
        logger.removeHandler(later)
        logger.propagate = True
    assert TOKEN not in buffer.getvalue()
    assert REDACTED in buffer.getvalue()


def test_the_limiter_allows_a_burst_then_the_rate_and_reports_what_it_dropped() -> None:
    now = [0.0]
    limiter = LogLimiter(rate_per_s=1.0, burst=3, report_every_s=10.0, clock=lambda: now[0])
    reports: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            reports.append(record)

    collector = Collect()
    logging.getLogger("toolmesh.logs").addHandler(collector)
    try:
        assert [limiter.allow("site") for _ in range(5)] == [True, True, True, False, False]
        assert limiter.allow("other")  # every site has its own bucket
        now[0] = 1.0
        assert limiter.allow("site") and not limiter.allow("site")
        assert reports == []  # not yet: at most one report per 10 s
        now[0] = 10.0
        limiter.flush()
    finally:
        logging.getLogger("toolmesh.logs").removeHandler(collector)
    (report,) = reports
    assert report.getMessage() == "3 similar messages suppressed"
    assert report.__dict__["site"] == "site" and report.__dict__["suppressed"] == 3


def test_the_limiter_forgets_the_least_recently_used_site() -> None:
    limiter = LogLimiter(rate_per_s=0.0, burst=1, max_sites=2, clock=lambda: 0.0)
    assert limiter.allow("a") and limiter.allow("b")
    assert not limiter.allow("a")
    assert limiter.allow("c")  # "b" is forgotten, "a" kept
    assert limiter.allow("b") and not limiter.allow("c")
