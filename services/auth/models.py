"""Database tables of the auth service; every replica shares them.

Times are stored as UNIX seconds (float) so SQLite and PostgreSQL compare them alike.
"""

from __future__ import annotations

from sqlalchemy import Boolean, Float, Index, Integer, String, Text, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from services.kit.outbox_table import outbox_tables

KEY_ACTIVE = "active"
KEY_VERIFYING = "verifying"
KEY_RETIRED = "retired"

CLIENT_ENABLED = "enabled"
CLIENT_DISABLED = "disabled"
CLIENT_REVOKED = "revoked"
CLIENT_DELETED = "deleted"


class Base(DeclarativeBase):
    pass


class SigningKeyRow(Base):
    """Metadata and public half of a signing key; the private half is a file in the keys dir."""

    __tablename__ = "auth_signing_keys"
    __table_args__ = (
        # At most one active key, even when two replicas rotate at once.
        Index(
            "auth_one_active_key",
            "state",
            unique=True,
            sqlite_where=text("state = 'active'"),
            postgresql_where=text("state = 'active'"),
        ),
    )

    kid: Mapped[str] = mapped_column(String(64), primary_key=True)
    alg: Mapped[str] = mapped_column(String(16))
    # Base64url Ed25519 public key (the JWK "x").
    public_x: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), index=True)
    dev: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[float] = mapped_column(Float)
    state_changed_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # An active key signs from then on; before, the newest verifying key still signs.
    signs_from: Mapped[float] = mapped_column(Float)


class ClientRow(Base):
    """A service account; only an argon2id hash of its secret is kept."""

    __tablename__ = "auth_clients"

    client_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    # Space-separated, as in the token's scope claim.
    scopes: Mapped[str] = mapped_column(Text)
    roles: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16), index=True)
    # Empty once the client is revoked or deleted: no secret can match.
    secret_hash: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)


class RevokedTokenRow(Base):
    """A revoked token id in one tenant ("" = any tenant), kept until the token would have
    expired anyway. Keyed by tenant so that one tenant's admin cannot revoke another's tokens
    (and revoking the same id in two tenants is two rows)."""

    __tablename__ = "auth_revoked_tokens"

    tenant: Mapped[str] = mapped_column(String(64), primary_key=True, server_default="")
    jti: Mapped[str] = mapped_column(String(64), primary_key=True)
    expires_at: Mapped[float] = mapped_column(Float, index=True)
    revoked_at: Mapped[float] = mapped_column(Float)


class PolicyVersionRow(Base):
    """One row per policy change: the version number is the primary key, so two replicas
    changing the policy at once cannot make the same version (the second retries)."""

    __tablename__ = "auth_policy_versions"

    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    created_at: Mapped[float] = mapped_column(Float)
    # Who made it ("" for the seed import) and what it did, e.g. "admin.tenant.allow".
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64))
    # JSON: the change's target and details, as in its audit event.
    details: Mapped[str] = mapped_column(Text)


class TenantRow(Base):
    """A tenant and its tool allowlist (services.kit.allowlist entries)."""

    __tablename__ = "auth_tenants"

    tenant: Mapped[str] = mapped_column(String(64), primary_key=True)
    # JSON list, in the order the entries were allowed.
    allowed_tools: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    changed_in_version: Mapped[int] = mapped_column(Integer)


class RoleRow(Base):
    """A role and the scopes it grants; roles are shared by every tenant."""

    __tablename__ = "auth_roles"

    role: Mapped[str] = mapped_column(String(64), primary_key=True)
    # Space-separated, as in the token's scope claim.
    scopes: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[float] = mapped_column(Float)
    changed_in_version: Mapped[int] = mapped_column(Integer)


# Audit events waiting for telemetry, written in the transaction of the change they record.
AUDIT_OUTBOX = outbox_tables(Base.metadata, "auth")
