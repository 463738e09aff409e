"""Reads and writes of keys, clients and revocations; the database is shared by all replicas.

Every change takes an optional ``audit`` hook: given the changed row, it returns the outbox
items (audit events) that record the change, inserted into ``auth_outbox`` in the change's own
transaction, so the change and its audit events commit together or not at all.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from sqlalchemy import delete, func, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from services.auth.migrations import MIGRATIONS
from services.auth.models import (
    AUDIT_OUTBOX,
    CLIENT_DELETED,
    CLIENT_ENABLED,
    CLIENT_REVOKED,
    KEY_ACTIVE,
    KEY_RETIRED,
    KEY_VERIFYING,
    ClientRow,
    RevokedTokenRow,
    SigningKeyRow,
)
from services.kit.db import session_factory
from services.kit.migrations import check_schema
from services.kit.outbox import Item
from services.kit.outbox_table import insert_items
from services.kit.tokens import MAX_TOKEN_LIFETIME_S

PRUNE_EVERY_S = 30.0
R = TypeVar("R")
# The changed row -> the outbox items recording the change (services.auth.audit.Staged.items).
Audit = Callable[[R], Sequence[Item]]


class StoreError(Exception):
    """A request the current data does not allow; the message is safe to show the caller."""


class NotFound(StoreError):
    pass


class OtherTenant(NotFound):
    """The client exists in another tenant than the one the caller may act in. Its message is
    the unknown client's, so a caller cannot tell the two apart; only the audit can."""

    def __init__(self, client_id: str, tenant: str) -> None:
        super().__init__(f"no client {client_id}")
        self.tenant = tenant


class Conflict(StoreError):
    pass


class WrongState(StoreError):
    pass


class Contended(StoreError):
    """Concurrent changes kept winning the race; retrying later will do (ABORTED)."""


@dataclass(frozen=True)
class Standing:
    """Whether a verified token still stands: its revocation and its client's state."""

    revoked: bool
    client_state: str | None


class Store:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._dialect = engine.dialect.name
        self._sessions = session_factory(engine)
        self._pruned_at = 0.0

    async def create_schema(self, *, migrate: bool = True) -> None:
        """Bring the schema to this release's head (services/auth/migrations) under the schema
        lock, so replicas starting together take turns; with ``migrate`` false only check it.

        Raises SchemaMismatch (a StartupRefused) naming what to run when the schema is newer than
        this release, or behind it and ``migrate`` is false.
        """
        await check_schema(self._engine, MIGRATIONS, migrate_on_start=migrate)

    async def _audit(self, session: AsyncSession, audit: Audit[R] | None, row: R) -> None:
        """Insert the change's audit events in the change's transaction (flushing it first, so
        a refused change raises before any event is built)."""
        if audit is None:
            return
        await session.flush()
        items = audit(row)
        if items:
            await session.execute(insert_items(self._dialect, AUDIT_OUTBOX.items, items))

    # --- signing keys -------------------------------------------------------------------

    async def active_key(self) -> SigningKeyRow | None:
        async with self._sessions() as session:
            query = select(SigningKeyRow).where(SigningKeyRow.state == KEY_ACTIVE)
            return (await session.scalars(query)).first()

    async def key(self, kid: str) -> SigningKeyRow | None:
        async with self._sessions() as session:
            return await session.get(SigningKeyRow, kid)

    async def keys(self, *states: str) -> list[SigningKeyRow]:
        query = select(SigningKeyRow).order_by(SigningKeyRow.created_at.desc())
        if states:
            query = query.where(SigningKeyRow.state.in_(states))
        async with self._sessions() as session:
            return list(await session.scalars(query))

    async def add_first_key(self, kid: str, x: str, *, dev: bool) -> bool:
        """Record a key as active if none is; False when another replica got there first."""
        now = time.time()
        row = SigningKeyRow(
            kid=kid,
            alg="EdDSA",
            public_x=x,
            state=KEY_ACTIVE,
            dev=dev,
            created_at=now,
            signs_from=now,
        )
        try:
            async with self._sessions.begin() as session:
                session.add(row)
        except IntegrityError:
            return False
        return True

    async def signing_key(self) -> SigningKeyRow | None:
        """The active key, or while it is only published (not yet signing) the previous one."""
        async with self._sessions() as session:
            active = (
                await session.scalars(
                    select(SigningKeyRow).where(SigningKeyRow.state == KEY_ACTIVE)
                )
            ).first()
            if active is None or active.signs_from <= time.time():
                return active
            previous = (
                await session.scalars(
                    select(SigningKeyRow)
                    .where(SigningKeyRow.state == KEY_VERIFYING)
                    .order_by(SigningKeyRow.state_changed_at.desc())
                )
            ).first()
            return previous or active

    async def rotate_to(
        self,
        kid: str,
        x: str,
        publish_ahead_s: float,
        audit: Audit[tuple[SigningKeyRow, SigningKeyRow | None]] | None = None,
    ) -> tuple[SigningKeyRow, SigningKeyRow | None]:
        """Make a new key active and the active one verifying, in one transaction."""
        now = time.time()
        try:
            async with self._sessions.begin() as session:
                previous = (
                    await session.scalars(
                        select(SigningKeyRow)
                        .where(SigningKeyRow.state == KEY_ACTIVE)
                        .with_for_update()
                    )
                ).first()
                if previous is not None:
                    previous.state = KEY_VERIFYING
                    previous.state_changed_at = now
                    await session.flush()
                new = SigningKeyRow(
                    kid=kid,
                    alg="EdDSA",
                    public_x=x,
                    state=KEY_ACTIVE,
                    dev=False,
                    created_at=now,
                    signs_from=now + (publish_ahead_s if previous else 0),
                )
                session.add(new)
                await self._audit(session, audit, (new, previous))
        except IntegrityError as error:
            raise Conflict("another key rotation ran at the same time; retry") from error
        return new, previous

    async def retire(self, kid: str, audit: Audit[SigningKeyRow] | None = None) -> SigningKeyRow:
        async with self._sessions.begin() as session:
            row = await session.get(SigningKeyRow, kid, with_for_update=True)
            if row is None:
                raise NotFound(f"no key {kid}")
            if row.state == KEY_ACTIVE:
                raise WrongState("the active key cannot be retired; rotate first")
            if row.state == KEY_VERIFYING:
                row.state = KEY_RETIRED
                row.state_changed_at = time.time()
            await self._audit(session, audit, row)
            return row

    # --- clients ------------------------------------------------------------------------

    async def client(self, client_id: str) -> ClientRow | None:
        async with self._sessions() as session:
            return await session.get(ClientRow, client_id)

    async def add_client(self, row: ClientRow, audit: Audit[ClientRow] | None = None) -> None:
        try:
            async with self._sessions.begin() as session:
                session.add(row)
                await self._audit(session, audit, row)
        except IntegrityError as error:
            raise Conflict(f"client {row.client_id} already exists") from error

    async def list_clients(self, tenant: str, include_deleted: bool) -> list[ClientRow]:
        query = select(ClientRow).order_by(ClientRow.tenant, ClientRow.client_id)
        if tenant:
            query = query.where(ClientRow.tenant == tenant)
        if not include_deleted:
            query = query.where(ClientRow.state != CLIENT_DELETED)
        async with self._sessions() as session:
            return list(await session.scalars(query))

    async def set_client_state(
        self,
        client_id: str,
        state: str,
        allowed_from: tuple[str, ...],
        tenant: str | None = None,
        audit: Audit[ClientRow] | None = None,
    ) -> ClientRow:
        """Move a client out of the enabled state; revoked and deleted also lose the secret.

        With ``tenant``, a client of another tenant is refused as OtherTenant (a NotFound)."""
        async with self._sessions.begin() as session:
            row = await _client_for_update(session, client_id, tenant)
            if row.state not in allowed_from:
                raise WrongState(f"client {client_id} is {row.state}")
            row.state = state
            if state in (CLIENT_REVOKED, CLIENT_DELETED):
                row.secret_hash = ""
            row.updated_at = time.time()
            await self._audit(session, audit, row)
            return row

    async def set_secret_hash(
        self,
        client_id: str,
        secret_hash: str,
        tenant: str | None = None,
        audit: Audit[ClientRow] | None = None,
    ) -> ClientRow:
        async with self._sessions.begin() as session:
            row = await _client_for_update(session, client_id, tenant)
            if row.state != CLIENT_ENABLED:
                raise WrongState(f"client {client_id} is {row.state}")
            row.secret_hash = secret_hash
            row.updated_at = time.time()
            await self._audit(session, audit, row)
            return row

    async def set_scopes(self, client_id: str, scopes: str) -> None:
        """Replace a client's scopes (the dev client's, when a release adds one)."""
        async with self._sessions.begin() as session:
            row = await session.get(ClientRow, client_id, with_for_update=True)
            if row is not None:
                row.scopes = scopes
                row.updated_at = time.time()

    # --- revocations --------------------------------------------------------------------

    async def revoke_token(
        self,
        tenant: str,
        jti: str,
        expires_at: float,
        audit: Audit[RevokedTokenRow] | None = None,
    ) -> RevokedTokenRow:
        """Record a revoked token id of ``tenant`` ("" = any tenant); idempotent: revoking
        again, even concurrently on several replicas, keeps one row with the later expiry."""
        dialect = postgresql if self._dialect == "postgresql" else sqlite
        insert = dialect.insert(RevokedTokenRow).values(
            tenant=tenant, jti=jti, expires_at=expires_at, revoked_at=time.time()
        )
        later = (func.greatest if self._dialect == "postgresql" else func.max)(
            RevokedTokenRow.expires_at, insert.excluded.expires_at
        )
        upsert = insert.on_conflict_do_update(
            index_elements=[RevokedTokenRow.tenant, RevokedTokenRow.jti],
            set_={"expires_at": later},
        ).returning(RevokedTokenRow)
        async with self._sessions.begin() as session:
            row: RevokedTokenRow = (await session.scalars(upsert)).one()
            await self._audit(session, audit, row)
            return row

    async def revocations(self) -> tuple[list[RevokedTokenRow], list[str], float]:
        """Revoked ids still unexpired and clients not enabled, pruning what can no longer matter.

        A deleted client's tombstone goes once every token it could hold has expired. Verifiers
        poll this often, so the pruning write runs at most every PRUNE_EVERY_S per replica.
        """
        now = time.time()
        async with self._sessions.begin() as session:
            if now - self._pruned_at >= PRUNE_EVERY_S:
                self._pruned_at = now
                await session.execute(
                    delete(RevokedTokenRow).where(RevokedTokenRow.expires_at < now)
                )
                await session.execute(
                    delete(ClientRow).where(
                        ClientRow.state == CLIENT_DELETED,
                        ClientRow.updated_at < now - MAX_TOKEN_LIFETIME_S - 60,
                    )
                )
            revoked = list(
                await session.scalars(
                    select(RevokedTokenRow)
                    .where(RevokedTokenRow.expires_at >= now)
                    .order_by(RevokedTokenRow.expires_at)
                )
            )
            disabled = list(
                await session.scalars(
                    select(ClientRow.client_id)
                    .where(ClientRow.state != CLIENT_ENABLED)
                    .order_by(ClientRow.client_id)
                )
            )
        return revoked, disabled, now

    async def standing(self, tenant: str, jti: str, subject: str) -> Standing:
        """Read after the signature verified, so an unsigned token learns nothing of our data."""
        async with self._sessions() as session:
            revoked = await session.scalar(
                select(RevokedTokenRow.jti).where(
                    RevokedTokenRow.jti == jti,
                    or_(RevokedTokenRow.tenant == tenant, RevokedTokenRow.tenant == ""),
                )
            )
            state = await session.scalar(
                select(ClientRow.state).where(ClientRow.client_id == subject)
            )
        return Standing(revoked=revoked is not None, client_state=state)


async def _client_for_update(
    session: AsyncSession, client_id: str, tenant: str | None
) -> ClientRow:
    row = await session.get(ClientRow, client_id, with_for_update=True)
    if row is None or row.state == CLIENT_DELETED:
        raise NotFound(f"no client {client_id}")
    if tenant is not None and row.tenant != tenant:
        raise OtherTenant(client_id, row.tenant)
    return row
