"""The policy in auth's database: tenants, roles and one row per version.

Every change runs in one transaction that reads the latest version N, applies the change and
inserts version N+1. The version is the primary key, so two replicas changing the policy at
once cannot both make N+1: the loser's transaction fails as a whole (IntegrityError on
PostgreSQL, a busy snapshot on SQLite) and is retried on the new state. The version row holds
who changed what, in the same commit as the change itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from services.auth.models import AUDIT_OUTBOX, PolicyVersionRow, RoleRow, TenantRow
from services.auth.policy import Policy, PolicyInForce, load_policy
from services.auth.settings import AuthSettings
from services.auth.store import Audit, Contended
from services.kit.db import session_factory
from services.kit.outbox_table import insert_items
from services.kit.startup import setting_guard

log = logging.getLogger("toolmesh.auth.policy")

# Attempts of a change that lost a race with another replica's change.
CHANGE_ATTEMPTS = 8


@dataclass(frozen=True)
class Change:
    """What a change did: its details (None: nothing to change, no new version)."""

    details: Mapping[str, object] | None


Mutation = Callable[[AsyncSession, int], Awaitable[Change]]


class _Unchanged(Exception):
    """Leaves the transaction without committing: the change would change nothing."""

    def __init__(self, version: int) -> None:
        super().__init__(version)
        self.version = version


def tools_of(row: TenantRow) -> list[str]:
    return [str(entry) for entry in json.loads(row.allowed_tools)]


class PolicyStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._dialect = engine.dialect.name
        self._sessions = session_factory(engine)

    async def version(self) -> int:
        async with self._sessions() as session:
            return int(await session.scalar(select(func.max(PolicyVersionRow.version))) or 0)

    async def read(self) -> PolicyInForce:
        async with self._sessions() as session:
            return await _read(session)

    async def tenants(self, tenant: str = "") -> tuple[list[TenantRow], int]:
        """Every tenant (or only ``tenant``) and the version they were read at."""
        async with self._sessions() as session:
            number = int(await session.scalar(select(func.max(PolicyVersionRow.version))) or 0)
            query = select(TenantRow).order_by(TenantRow.tenant)
            if tenant:
                query = query.where(TenantRow.tenant == tenant)
            return list(await session.scalars(query)), number

    async def seed(self, policy: Policy, source: str) -> bool:
        """Import ``policy`` as version 1 into an empty database; False when it holds a policy
        already (or another replica imported it first)."""
        now = time.time()
        try:
            async with self._sessions.begin() as session:
                if await session.scalar(select(func.count()).select_from(PolicyVersionRow)):
                    return False
                session.add(
                    PolicyVersionRow(
                        version=1,
                        created_at=now,
                        actor="",
                        action="admin.policy.seed",
                        details=json.dumps({"source": source, "file_version": policy.version}),
                    )
                )
                for name, rules in policy.tenants.items():
                    session.add(
                        TenantRow(
                            tenant=name,
                            allowed_tools=json.dumps(list(dict.fromkeys(rules.allowed_tools))),
                            created_at=now,
                            updated_at=now,
                            changed_in_version=1,
                        )
                    )
                for role, scopes in policy.roles.items():
                    session.add(
                        RoleRow(
                            role=role,
                            scopes=" ".join(dict.fromkeys(scopes)),
                            updated_at=now,
                            changed_in_version=1,
                        )
                    )
        except IntegrityError:
            return False
        return True

    async def change(
        self, actor: str, action: str, mutate: Mutation, audit: Audit[int] | None = None
    ) -> tuple[int, bool]:
        """Apply ``mutate`` as version N+1 with its version row and its audit events (``audit``,
        given the new version) in one transaction; returns the version in force afterwards and
        whether this call made it. A StoreError ``mutate`` raises refuses the change and is
        passed on."""
        for attempt in range(CHANGE_ATTEMPTS):
            try:
                async with self._sessions.begin() as session:
                    latest = int(
                        await session.scalar(select(func.max(PolicyVersionRow.version))) or 0
                    )
                    change = await mutate(session, latest + 1)
                    if change.details is None:
                        raise _Unchanged(latest)
                    session.add(
                        PolicyVersionRow(
                            version=latest + 1,
                            created_at=time.time(),
                            actor=actor[:128],
                            action=action,
                            details=json.dumps(dict(change.details), sort_keys=True),
                        )
                    )
                    items = audit(latest + 1) if audit else []
                    if items:
                        await session.execute(
                            insert_items(self._dialect, AUDIT_OUTBOX.items, items)
                        )
                return latest + 1, True
            except _Unchanged as unchanged:
                return unchanged.version, False
            except (IntegrityError, OperationalError) as error:
                if isinstance(error, OperationalError) and self._dialect != "sqlite":
                    raise
                log.info("policy change raced another one; retrying", extra={"try": attempt + 1})
                await asyncio.sleep(random.uniform(0, 0.01 * 2**attempt))
        raise Contended("the policy kept changing concurrently; retry")


async def _read(session: AsyncSession) -> PolicyInForce:
    number = int(await session.scalar(select(func.max(PolicyVersionRow.version))) or 0)
    tenants = {row.tenant: tuple(tools_of(row)) for row in await session.scalars(select(TenantRow))}
    roles = {row.role: tuple(row.scopes.split()) for row in await session.scalars(select(RoleRow))}
    return PolicyInForce(number, roles=roles, tenants=tenants)


async def seed_policy(settings: AuthSettings, policies: PolicyStore) -> bool:
    """A fresh install: import the policy file as version 1. The file is read only while the
    database holds no policy; True when this replica imported it."""
    if await policies.version():
        return False
    with setting_guard(settings, "policy_file", "point {setting} at a valid policy file"):
        seed = load_policy(settings.policy_file)
    seeded = await policies.seed(seed, str(settings.policy_file))
    if seeded:
        log.info(
            "policy file imported as version 1",
            extra={"file": str(settings.policy_file), "file_version": seed.version},
        )
    return seeded
