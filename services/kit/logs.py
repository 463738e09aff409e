"""JSON structured logs: one object per line, carrying the trace, span and request ids.

Two rules hold for every line a toolmesh process writes:

- **Secrets never reach a log.** One redaction rule (``redact``) replaces bearer tokens,
  JWT-shaped strings, ``password=``/``client_secret=``-style values, passwords in URLs and PEM
  private keys by ``[REDACTED]``. It runs when a record is created (a log record factory, so it
  covers grpc's own logger and any handler added later) and again in a filter on the kit's
  handler (for ``extra`` fields, which are attached after the record is created).
- **A caller cannot flood the logs.** Lines caused by bad input go through ``LIMITER``, one token
  bucket per log site; what it suppresses is counted (metric ``toolmesh.log.suppressed``) and
  summed up in a periodic "N similar messages suppressed" line.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace
from pythonjsonlogger.json import JsonFormatter

from services.kit.context import request_id_var

REDACTED = "[REDACTED]"

# Names of secrets, not secrets themselves.
_SECRET_NAMES = "|".join(
    (
        "client_secret",
        "secret",
        "api[_-]?key",
        "apikey",
        "password",
        "passwd",
        "pwd",
        "access_token",
        "refresh_token",
        "id_token",
        "token",
        "private_key",
        "authorization",
    )
)
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # PEM private keys, whole (or to the end of the text when cut off).
    (
        re.compile(
            r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\Z)",
            re.DOTALL,
        ),
        REDACTED,
    ),
    # Authorization schemes: the credential is everything up to whitespace or a quote, so a
    # token with undecodable bytes (shown as \xff escapes) goes as a whole.
    (re.compile(r"(?i)\b(bearer|basic)\s+[^\s'\",;]+"), rf"\1 {REDACTED}"),
    # JWT-shaped strings (header.payload.signature, base64url, header starting {" ).
    (re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_\-]*"), REDACTED),
    # key=value / "key": "value" pairs whose key names a secret.
    (
        re.compile(
            rf"(?i)(\b(?:{_SECRET_NAMES})\s*=\s*[\"']?|[\"'](?:{_SECRET_NAMES})[\"']\s*:\s*[\"']?)"
            r"(?!\[REDACTED\])[^\s\"',;&}]+"
        ),
        rf"\1{REDACTED}",
    ),
    # Passwords inside URLs: scheme://user:password@host.
    (re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:/\s@]*:)[^@\s/]+(@)"), rf"\1{REDACTED}\2"),
)


def redact(text: str) -> str:
    """``text`` with every secret-shaped substring replaced by ``[REDACTED]``."""
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def _redact_value(value: object) -> object:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, bytes):
        return redact(value.decode("utf-8", errors="backslashreplace"))
    if isinstance(value, Mapping):
        return {key: _redact_value(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_redact_value(item) for item in value]
    return value


# Attributes every LogRecord has; anything else on a record came in through ``extra``.
_STANDARD_ATTRIBUTES = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


def redact_record(record: logging.LogRecord) -> None:
    """Redact a record in place: its message, exception and stack text, and ``extra`` fields.

    The message is formatted once here (args merged), and an exception is rendered to
    ``exc_text`` and its ``exc_info`` dropped, so that no formatter can render the raw text
    again later.
    """
    if isinstance(record.msg, Mapping) and not record.args:
        # A dict message becomes fields of the JSON line: keep it a dict.
        record.msg = _redact_value(record.msg)
    elif record.args or not isinstance(record.msg, str):
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not lose the line
            message = f"{record.msg!r} {record.args!r}"
        record.msg, record.args = message, None
    if isinstance(record.msg, str):
        record.msg = redact(record.msg)
    if record.exc_info:
        if not record.exc_text:
            record.exc_text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
        record.exc_info = None
    if record.exc_text:
        record.exc_text = redact(record.exc_text)
    if record.stack_info:
        record.stack_info = redact(record.stack_info)
    for key, value in list(record.__dict__.items()):
        if key not in _STANDARD_ATTRIBUTES and isinstance(
            value, str | bytes | Mapping | list | tuple | set | frozenset
        ):
            record.__dict__[key] = _redact_value(value)


class RedactionFilter(logging.Filter):
    """Handler filter: redacts every record the handler writes, ``extra`` fields included."""

    def filter(self, record: logging.LogRecord) -> bool:
        redact_record(record)
        return True


_REDACTION = RedactionFilter()
# Libraries whose INFO chatter is not ours to report: configure_logging raises them to WARNING.
NOISY_LOGGERS = ("grpc", "urllib3", "sqlalchemy.engine", "aiosqlite")
_factory_lock = threading.Lock()
_base_factory: Callable[..., logging.LogRecord] | None = None


def _redacting_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
    assert _base_factory is not None
    record = _base_factory(*args, **kwargs)
    redact_record(record)
    return record


def forget_redaction_factory() -> None:
    """Let ``install_redaction`` install its factory again after someone replaced the record
    factory (a test restoring the interpreter's logging state)."""
    global _base_factory  # noqa: PLW0603 - one factory per process
    with _factory_lock:
        _base_factory = None


def install_redaction() -> None:
    """Redact every record of every logger from now on (idempotent).

    The record factory covers records created by any logger (grpc's own included) whatever
    handler later writes them; the filter is added to every handler that exists now, for
    ``extra`` fields. ``configure_logging`` calls this; so may code that adds a handler.
    """
    global _base_factory  # noqa: PLW0603 - one factory per process
    with _factory_lock:
        if _base_factory is None:
            _base_factory = logging.getLogRecordFactory()
            logging.setLogRecordFactory(_redacting_factory)
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for logger in loggers:
        if isinstance(logger, logging.Logger):
            for handler in logger.handlers:
                if _REDACTION not in handler.filters:
                    handler.addFilter(_REDACTION)


# --- rate limiting of lines a caller can cause ----------------------------------------------


@dataclass
class _Bucket:
    tokens: float
    updated: float
    suppressed: int = 0
    reported: float = 0.0


class LogLimiter:
    """Token buckets per log site (``key``): ``burst`` lines at once, ``rate_per_s`` after.

    Suppressed lines are counted per site (metric ``toolmesh.log.suppressed``) and reported as
    one "N similar messages suppressed" line per site at most every ``report_every_s``, the
    next time that site logs or when ``flush`` runs (the server calls it periodically). At most
    ``max_sites`` sites are tracked; the least recently used one is forgotten first.
    """

    def __init__(
        self,
        rate_per_s: float = 1.0,
        burst: int = 20,
        report_every_s: float = 60.0,
        max_sites: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rate = rate_per_s
        self._burst = float(burst)
        self._report_every_s = report_every_s
        self._max_sites = max_sites
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._lock = threading.Lock()
        self._counter: Any = None
        self._log = logging.getLogger("toolmesh.logs")

    def allow(self, key: str) -> bool:
        """Whether a line of site ``key`` may be written now (and take a token if so)."""
        now = self._clock()
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = _Bucket(tokens=self._burst, updated=now, reported=now)
                self._buckets[key] = bucket
                while len(self._buckets) > self._max_sites:
                    self._buckets.popitem(last=False)
            else:
                self._buckets.move_to_end(key)
                bucket.tokens = min(
                    self._burst, bucket.tokens + (now - bucket.updated) * self._rate
                )
                bucket.updated = now
            allowed = bucket.tokens >= 1.0
            if allowed:
                bucket.tokens -= 1.0
            else:
                bucket.suppressed += 1
        if not allowed:
            self._count(key)
        self.flush(only=key)
        return allowed

    def log(
        self,
        logger: logging.Logger,
        level: int,
        key: str,
        message: str,
        extra: Mapping[str, object] | None = None,
    ) -> None:
        """Write ``message`` unless site ``key`` is over its rate."""
        if logger.isEnabledFor(level) and self.allow(key):
            logger.log(level, message, extra=dict(extra or {}))

    def flush(self, only: str | None = None) -> None:
        """Report the suppressed counts whose reporting interval has passed."""
        now = self._clock()
        due: list[tuple[str, int]] = []
        with self._lock:
            keys = [only] if only is not None else list(self._buckets)
            for key in keys:
                bucket = self._buckets.get(key)
                if bucket and bucket.suppressed and now - bucket.reported >= self._report_every_s:
                    due.append((key, bucket.suppressed))
                    bucket.suppressed = 0
                    bucket.reported = now
        for key, count in due:
            self._log.warning(
                "%d similar messages suppressed",
                count,
                extra={"site": key, "suppressed": count},
            )

    def _count(self, key: str) -> None:
        if self._counter is None:
            from services.kit.metrics import meter

            self._counter = meter().create_counter(
                "toolmesh.log.suppressed",
                description="Log lines dropped by the rate limit for lines callers can cause.",
            )
        self._counter.add(1, {"site": key.split(" ", 1)[0]})


# The one limiter of a process, for every line a caller's bad input can cause.
LIMITER = LogLimiter()


# --- configuration -------------------------------------------------------------------------


class _ContextFilter(logging.Filter):
    """Stamps every record with the ids of the request and span it was logged under."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = trace.get_current_span().get_span_context()
        record.service = self._service
        record.trace_id = format(ctx.trace_id, "032x") if ctx.is_valid else ""
        record.span_id = format(ctx.span_id, "016x") if ctx.is_valid else ""
        record.request_id = request_id_var.get()
        return True


class _GrpcNoise(logging.Filter):
    """grpc's own logger reports a caller's undecodable metadata at ERROR with a traceback,
    once per read of it: turn that into one rate-limited INFO line without the value."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("Invalid encoding on"):
            return True
        if not LIMITER.allow("grpc.metadata undecodable"):
            return False
        record.msg, record.args = "metadata value is not valid UTF-8; ignored", None
        record.exc_info, record.exc_text = None, None
        record.levelno, record.levelname = logging.INFO, "INFO"
        return True


_GRPC_NOISE = _GrpcNoise()


def configure_logging(service: str, level: str = "INFO") -> None:
    """Send redacted JSON lines to stderr; replaces any handler set before."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter(
            "{asctime}{levelname}{name}{message}{service}{trace_id}{span_id}{request_id}",
            style="{",
            rename_fields={"asctime": "ts", "levelname": "level", "name": "logger"},
            timestamp=False,
        )
    )
    handler.addFilter(_ContextFilter(service))
    handler.addFilter(_REDACTION)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # gRPC's own and HTTP client chatter is not ours to report at INFO.
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    cygrpc = logging.getLogger("grpc._cython.cygrpc")
    if _GRPC_NOISE not in cygrpc.filters:
        cygrpc.addFilter(_GRPC_NOISE)
    install_redaction()
