"""Settings of the auth service (env TOOLMESH_AUTH_<FIELD>, falling back to TOOLMESH_<FIELD>)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field

from services.kit.db import sqlite_url
from services.kit.settings import DEFAULT_PORTS, ServiceSettings

PACKAGED_POLICY = Path(__file__).with_name("policy.toml")

# No token may live longer than this; verification refuses longer ones whatever their signature.
MAX_TOKEN_LIFETIME_S = 3600


class AuthSettings(ServiceSettings):
    service_name: ClassVar[str] = "auth"

    port: int = Field(default=DEFAULT_PORTS["auth"], ge=0, le=65535)
    # Empty means the SQLite file <data_dir>/auth.db.
    database_url: str = ""
    issuer: str = Field(default="toolmesh-auth", min_length=1)
    audience: str = Field(default="toolmesh", min_length=1)
    token_ttl_s: int = Field(default=900, ge=10, le=MAX_TOKEN_LIFETIME_S)
    # Clock skew tolerated when checking exp, nbf and iat.
    leeway_s: int = Field(default=10, ge=0, le=30)
    policy_file: Path = PACKAGED_POLICY
    # How often, at most, the policy file's mtime is checked for a reload.
    policy_check_interval_s: float = Field(default=3.0, ge=0)
    # Seconds a rotated key sits in the JWKS before it signs, so verifiers caching the JWKS (and
    # throttling refetches on an unknown kid) learn it before they meet tokens signed with it.
    key_publish_ahead_s: float = Field(default=0.0, ge=0, le=3600)
    # Empty means <data_dir>/auth/keys.
    keys_dir: Path | None = None
    # Wrong secrets per client id within the window before IssueToken backs off.
    throttle_failures: int = Field(default=5, ge=1)
    throttle_window_s: float = Field(default=60.0, gt=0)
    throttle_backoff_s: float = Field(default=60.0, gt=0)

    def db_url(self) -> str:
        return self.database_url or sqlite_url(self.data_dir, "auth")

    def resolved_keys_dir(self) -> Path:
        return self.keys_dir or self.data_dir / "auth" / "keys"

    def dev_client_file(self) -> Path:
        return self.data_dir / "auth" / "dev-client.json"
