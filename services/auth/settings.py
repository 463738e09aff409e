"""Settings of the auth service (env TOOLMESH_AUTH_<FIELD>, falling back to TOOLMESH_<FIELD>)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field

from services.kit.settings import DEFAULT_PORTS, DatabaseSettings
from services.kit.tokens import MAX_LEEWAY_S, MAX_TOKEN_LIFETIME_S

PACKAGED_POLICY = Path(__file__).with_name("policy.toml")


class AuthSettings(DatabaseSettings):
    service_name: ClassVar[str] = "auth"

    port: int = Field(default=DEFAULT_PORTS["auth"], ge=0, le=65535)
    # Empty means the SQLite file <data_dir>/auth.db.
    database_url: str = ""
    issuer: str = Field(default="toolmesh-auth", min_length=1)
    audience: str = Field(default="toolmesh", min_length=1)
    token_ttl_s: int = Field(default=900, ge=10, le=MAX_TOKEN_LIFETIME_S)
    # Clock skew tolerated when checking exp, nbf and iat.
    leeway_s: int = Field(default=10, ge=0, le=MAX_LEEWAY_S)
    # Seeds a fresh install: imported as policy version 1 while the database holds no policy,
    # ignored after that (tenants and roles are then changed with the admin RPCs).
    policy_file: Path = PACKAGED_POLICY
    # How often, at most, a replica checks the database's policy version for IssueToken and
    # CreateClient; GetPolicy and this replica's own changes always check.
    policy_check_interval_s: float = Field(default=3.0, ge=0)
    # Seconds a rotated key sits in the JWKS before it signs, so verifiers caching the JWKS (and
    # throttling refetches on an unknown kid) learn it before they meet tokens signed with it.
    key_publish_ahead_s: float = Field(default=0.0, ge=0, le=3600)
    # Empty means <data_dir>/auth/keys.
    keys_dir: Path | None = None
    # Wrong secrets per (client id, source address) within the window before IssueToken backs
    # off for that address; the owner's right secret from another address still works.
    throttle_failures: int = Field(default=5, ge=1)
    # Wrong secrets per client id from all addresses together within the window before
    # IssueToken backs off for every address but those where the right secret came from lately.
    throttle_client_failures: int = Field(default=50, ge=1)
    # Seconds over which wrong secrets are counted.
    throttle_window_s: float = Field(default=60.0, gt=0)
    # Seconds IssueToken answers RESOURCE_EXHAUSTED once a limit is reached.
    throttle_backoff_s: float = Field(default=60.0, gt=0)
    # How long an address where a client gave its right secret stays exempt from the
    # per-client ceiling (not from its own per-address limit).
    throttle_trusted_s: float = Field(default=86400.0, ge=0)
    # Where audit events go (telemetry's AppendAudit): host:port, a comma list of replicas,
    # ipv4:... or dns:///name:port. mTLS is used when this process has a certificate.
    telemetry_target: str = f"127.0.0.1:{DEFAULT_PORTS['telemetry']}"
    # Audit events wait for telemetry in the auth_outbox table of auth's own database, written
    # in the transaction of the change they record. This is only the outbox file of releases
    # before that (unset: <data_dir>/auth/audit-outbox.db): what it still holds is moved into
    # the table at start, and the file renamed *.adopted.
    audit_outbox_file: Path | None = None
    # Seconds each AppendAudit call may take before the batch is retried later.
    audit_call_timeout_s: float = Field(default=5.0, gt=0)
    # While telemetry is down the relay retries after a random delay of up to
    # base * 2^failures seconds (full jitter), capped at audit_backoff_max_s.
    audit_backoff_base_s: float = Field(default=0.2, ge=0)
    # The longest delay between two delivery attempts, in seconds.
    audit_backoff_max_s: float = Field(default=10.0, ge=0)

    def resolved_keys_dir(self) -> Path:
        return self.keys_dir or self.data_dir / "auth" / "keys"

    def resolved_audit_outbox_file(self) -> Path:
        return self.audit_outbox_file or self.data_dir / "auth" / "audit-outbox.db"

    def dev_client_file(self) -> Path:
        return self.data_dir / "auth" / "dev-client.json"
