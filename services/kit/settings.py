"""Settings from the environment: TOOLMESH_<SERVICE>_<NAME>, falling back to TOOLMESH_<NAME>.

The fallback lets one variable (TOOLMESH_DATA_DIR, TOOLMESH_ENV, ...) configure the whole mesh
while each service can still be set on its own.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import ClassVar

from pydantic import Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)


class Environment(StrEnum):
    DEV = "dev"
    PRODUCTION = "production"


DEFAULT_PORTS: dict[str, int] = {
    "gateway": 50051,
    "auth": 50052,
    "router": 50053,
    "memory": 50054,
    "telemetry": 50055,
    # The MCP face (HTTP), beside the gateway it fronts.
    "mcpface": 50056,
}
# Prometheus /metrics over HTTP, one port per service so they can share a host.
DEFAULT_METRICS_PORTS: dict[str, int] = {name: port - 40600 for name, port in DEFAULT_PORTS.items()}


class ServiceSettings(BaseSettings):
    """Settings shared by every server; subclasses set ``service_name`` and add their own."""

    service_name: ClassVar[str] = "service"
    # Inner services take calls only from mesh peers (mutual TLS, per-RPC peer rules); the
    # gateway, whose callers are outside the mesh, is the one public service.
    inner: ClassVar[bool] = True

    model_config = SettingsConfigDict(extra="ignore", case_sensitive=False)

    # dev or production; production refuses plaintext, dev keys and default secrets.
    env: Environment = Environment.DEV
    # Address to bind; 0.0.0.0 in a container.
    host: str = "127.0.0.1"
    # Subclasses default this to their port from DEFAULT_PORTS; 0 picks a free port.
    port: int = Field(default=0, ge=0, le=65535)
    # Where SQLite files, keys and the outbox live (relative to the working directory).
    data_dir: Path = Path("var")
    # Python logging level of the JSON logs on stderr.
    log_level: str = "INFO"
    # Seconds that in-flight calls get to finish after SIGTERM.
    grace_period_s: float = Field(default=10.0, ge=0)
    # Concurrent RPCs the server accepts before refusing with RESOURCE_EXHAUSTED.
    max_concurrent_rpcs: int = Field(default=1000, ge=1)
    # Where spans go over OTLP/gRPC (the telemetry service); empty disables export.
    otlp_endpoint: str = "127.0.0.1:50055"
    # Parent-based ratio sampler: share of new traces that are recorded.
    trace_sample_ratio: float = Field(default=1.0, ge=0.0, le=1.0)
    # Prometheus metrics port; unset means the service's default (945x), 0 turns it off.
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    # Mutual TLS: this process's certificate and key, and the mesh CA. All three or none.
    tls_cert_file: Path | None = None
    # PEM private key of tls_cert_file (mode 0600).
    tls_key_file: Path | None = None
    # PEM CA that signs every certificate of the mesh.
    tls_ca_file: Path | None = None
    # Inner services require a client certificate; the public gateway port may not.
    tls_require_client_auth: bool = True
    # Common names of client certificates allowed to call (comma-separated); empty admits any
    # peer with a certificate from the mesh CA (refused in production for inner services).
    # Which of them may call which RPC is fixed per service (services.kit.peers).
    allowed_peers: str = ""
    # Certificate names that play a mesh role under another name, "CN=role,CN=role" (the roles:
    # gateway, auth, router, memory, telemetry, operator, otel-collector).
    peer_aliases: str = ""
    # Database-owning services: bring the schema to this release's head at start-up (under a
    # lock, see services.kit.migrations). True suits the embedded SQLite dev mode; production
    # sets it false and runs `toolmesh migrate --service <name>` (the migration Job) before the
    # rollout, so a replica never changes the schema and refuses one it is not made for.
    migrate_on_start: bool = True

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        own = EnvSettingsSource(settings_cls, env_prefix=f"TOOLMESH_{cls.service_name.upper()}_")
        shared = EnvSettingsSource(settings_cls, env_prefix="TOOLMESH_")
        return (init_settings, own, shared, file_secret_settings)

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        if value.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError("one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        return value.upper()

    @field_validator("peer_aliases")
    @classmethod
    def _aliases_parse(cls, value: str) -> str:
        from services.kit.peers import parse_aliases

        parse_aliases(value)
        return value

    @model_validator(mode="after")
    def _tls_all_or_nothing(self) -> ServiceSettings:
        given = [self.tls_cert_file, self.tls_key_file, self.tls_ca_file]
        if any(given) and not all(given):
            raise ValueError("set all of tls_cert_file, tls_key_file and tls_ca_file, or none")
        return self

    @property
    def effective_metrics_port(self) -> int:
        if self.metrics_port is None:
            return DEFAULT_METRICS_PORTS.get(self.service_name, 0)
        return self.metrics_port

    @property
    def tls_enabled(self) -> bool:
        return bool(self.tls_cert_file and self.tls_key_file and self.tls_ca_file)

    @property
    def peer_allowlist(self) -> frozenset[str]:
        return frozenset(p.strip() for p in self.allowed_peers.split(",") if p.strip())

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def ensure_data_dir(self) -> Path:
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        return self.data_dir


class DatabaseSettings(ServiceSettings):
    """A service that keeps its state in a database of its own (auth, router, memory,
    telemetry): the one place its URL is resolved, so the services cannot drift apart."""

    # Empty means the SQLite file <data_dir>/<service>.db; a PostgreSQL URL for several replicas.
    database_url: str = ""

    def resolved_database_url(self) -> str:
        # Imported here: settings are read by processes without a database too (the MCP face,
        # the CLI), which should not load SQLAlchemy (about 20 MB and a third of a second).
        from services.kit.db import sqlite_url

        return self.database_url or sqlite_url(self.ensure_data_dir(), self.service_name)
