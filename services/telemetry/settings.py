"""Telemetry settings: TOOLMESH_TELEMETRY_<NAME>, falling back to TOOLMESH_<NAME>."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field, model_validator

from services.kit.db import sqlite_url
from services.kit.settings import DEFAULT_PORTS, ServiceSettings

_LOCAL_HOSTS = {"", "localhost", "127.0.0.1", "0.0.0.0", "::1", "[::1]"}


class TelemetrySettings(ServiceSettings):
    service_name: ClassVar[str] = "telemetry"

    port: int = Field(default=DEFAULT_PORTS["telemetry"], ge=0, le=65535)
    # Telemetry does not export its own spans: to itself they would loop (each Export is a span).
    otlp_endpoint: str = ""
    # Empty means the SQLite file <data_dir>/telemetry.db.
    database_url: str = ""
    # Spans that ended longer ago than this are deleted by a background task.
    retention_hours: float = Field(default=168, gt=0)
    prune_interval_s: float = Field(default=300, gt=0)
    # When set, received spans are also sent to this OTLP/gRPC endpoint (an OpenTelemetry
    # Collector) in the background; a full queue drops batches rather than slow ingest.
    forward_otlp_endpoint: str = ""
    forward_queue_batches: int = Field(default=1024, ge=1)
    # The versioned price table usage is priced with at ingest (see services.kit.pricing).
    prices_file: Path = Path(__file__).with_name("prices.toml")
    # Service level objectives GetSlo evaluates.
    slo_file: Path = Path(__file__).with_name("slo.toml")
    # How often expired budget reservations are deleted; they stop counting when they expire.
    reservation_sweep_interval_s: float = Field(default=60, gt=0)

    @model_validator(mode="after")
    def _never_export_to_self(self) -> TelemetrySettings:
        """A mesh-wide TOOLMESH_OTLP_ENDPOINT names this very server; ignore it here."""
        host, _, port = self.otlp_endpoint.removeprefix("http://").rpartition(":")
        own_host = host in _LOCAL_HOSTS or host == self.host
        if self.otlp_endpoint and own_host and port == str(self.port):
            self.otlp_endpoint = ""
        return self

    def resolved_database_url(self) -> str:
        return self.database_url or sqlite_url(self.ensure_data_dir(), "telemetry")
