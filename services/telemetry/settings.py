"""Telemetry settings: TOOLMESH_TELEMETRY_<NAME>, falling back to TOOLMESH_<NAME>."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import ClassVar

from pydantic import Field, model_validator

from services.kit.durability import Synchronous
from services.kit.settings import DEFAULT_PORTS, DatabaseSettings

_LOCAL_HOSTS = {"", "localhost", "127.0.0.1", "0.0.0.0", "::1", "[::1]"}


class TelemetrySettings(DatabaseSettings):
    service_name: ClassVar[str] = "telemetry"

    port: int = Field(default=DEFAULT_PORTS["telemetry"], ge=0, le=65535)
    # Telemetry does not export its own spans: to itself they would loop (each Export is a span).
    otlp_endpoint: str = ""
    # Empty means the SQLite file <data_dir>/telemetry.db.
    database_url: str = ""
    # SQLite only: PRAGMA synchronous of its database. FULL: a committed write survives
    # power loss (today's guarantee). NORMAL (WAL): it survives kill -9 of the process but
    # not a power loss or OS crash, and saves an fsync per commit (docs/reliability.md).
    sqlite_synchronous: Synchronous = "FULL"
    # Spans that ended longer ago than this are deleted by housekeeping.
    retention_hours: float = Field(default=168, gt=0)
    # Usage records (cost, statistics, SLOs, tool health) older than this many days are
    # deleted by housekeeping; 0 keeps them. GetCost looks back at most 366 days.
    usage_retention_days: float = Field(default=400, ge=0)
    # Audit events older than this many days may be deleted, and only up to a signed checkpoint
    # at least that old; 0 (the default) keeps the audit trail forever.
    audit_retention_days: float = Field(default=0, ge=0)
    # How often housekeeping enforces retention (and sweeps expired reservations).
    prune_interval_s: float = Field(default=300, gt=0)
    # Tail sampling of traces: the share of ordinary traces whose spans are kept, decided per
    # trace id (the same on every replica). Traces with an error span, or a span lasting at
    # least trace_keep_slow_ms, are always kept. 1 keeps every span.
    trace_keep_ratio: float = Field(default=1.0, ge=0.0, le=1.0)
    # A trace with a span lasting at least this long (milliseconds) is always kept.
    trace_keep_slow_ms: float = Field(default=500, gt=0)
    # Seconds after a trace's last span ended before its sampling decision is made; spans of
    # the trace that arrive later follow the decision.
    trace_decision_wait_s: float = Field(default=10, gt=0)
    # How often pending traces are decided (when trace_keep_ratio is below 1).
    trace_decision_interval_s: float = Field(default=2, gt=0)
    # When set, received spans are also sent to this OTLP/gRPC endpoint (an OpenTelemetry
    # Collector) in the background; a full queue drops batches rather than slow ingest.
    forward_otlp_endpoint: str = ""
    forward_queue_batches: int = Field(default=1024, ge=1)
    # The versioned price table usage is priced with at ingest (see services.kit.pricing).
    prices_file: Path = Path(__file__).with_name("prices.toml")
    # Service level objectives GetSlo evaluates.
    slo_file: Path = Path(__file__).with_name("slo.toml")
    # Seconds between checks of prices_file and slo_file for changes (also on SIGHUP); a file
    # that changed and validates is used from then on, a bad one is refused with one ERROR
    # line and the version in use stays. 0: only on SIGHUP.
    config_reload_s: float = Field(default=10.0, ge=0)
    # How often expired budget reservations are deleted; they stop counting when they expire.
    reservation_sweep_interval_s: float = Field(default=60, gt=0)
    # Ed25519 private key (PEM, mode 0600) that signs audit checkpoints; required in production.
    # Empty in development: <data_dir>/audit-signing-key.pem, created on first start.
    audit_key_file: Path | None = None
    # Directory of PEM public keys that verify checkpoints signed by earlier keys (rotation);
    # the signing key's own public key is always trusted. Empty: <data_dir>/audit-keyring.
    audit_keyring_dir: Path | None = None
    # Where the append-only checkpoint log is written, one file per replica; put it on a volume
    # that is not the database's and ship it off the host. Empty: <data_dir>/audit-checkpoints.
    audit_checkpoint_dir: Path | None = None
    # Seconds between checkpoints of every tenant whose chain head moved.
    audit_checkpoint_interval_s: float = Field(default=300, gt=0)
    # Name of this replica's checkpoint log (letters, digits, "-", "_", "."); empty: host name.
    replica_id: str = Field(default="", pattern=r"^[A-Za-z0-9._-]{0,64}$")

    @model_validator(mode="after")
    def _never_export_to_self(self) -> TelemetrySettings:
        """A mesh-wide TOOLMESH_OTLP_ENDPOINT names this very server; ignore it here."""
        host, _, port = self.otlp_endpoint.removeprefix("http://").rpartition(":")
        own_host = host in _LOCAL_HOSTS or host == self.host
        if self.otlp_endpoint and own_host and port == str(self.port):
            self.otlp_endpoint = ""
        return self

    def resolved_audit_key_file(self) -> Path:
        return self.audit_key_file or self.data_dir / "audit-signing-key.pem"

    def resolved_audit_keyring_dir(self) -> Path:
        return self.audit_keyring_dir or self.data_dir / "audit-keyring"

    def resolved_audit_checkpoint_dir(self) -> Path:
        return self.audit_checkpoint_dir or self.data_dir / "audit-checkpoints"

    def resolved_replica_id(self) -> str:
        name = self.replica_id or socket.gethostname()
        return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)[:64] or "telemetry"
