"""Who may administer what: a tenant admin (scope ``admin``) acts within its token's tenant; a
platform operator (scope ``platform:admin``) acts on every tenant and on the signing keys.

Granting: a tenant admin may give a client only scopes its own token holds (counting those the
client's roles grant), and never ``platform:admin``, so an admin cannot mint a client stronger
than itself or escape its tenant. A platform operator may grant any scope. To grant a scope it
holds, an admin's token must carry it: a token asked for with fewer scopes grants fewer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from services.kit.scopes import ADMIN, PLATFORM_ADMIN
from services.kit.tokens import Principal


@dataclass(frozen=True)
class Actor:
    """The verified caller of an admin RPC."""

    principal: Principal

    @property
    def tenant(self) -> str:
        return self.principal.tenant

    @property
    def subject(self) -> str:
        return self.principal.subject

    @property
    def platform(self) -> bool:
        return PLATFORM_ADMIN in self.principal.scopes

    def holds(self, scope: str) -> bool:
        """Whether the caller may do what ``scope`` allows; platform:admin includes admin."""
        if scope == ADMIN:
            return ADMIN in self.principal.scopes or self.platform
        return scope in self.principal.scopes

    def may_act_in(self, tenant: str) -> bool:
        return self.platform or tenant == self.tenant

    @property
    def tenant_filter(self) -> str | None:
        """The tenant the store must confine this caller to; None for a platform operator."""
        return None if self.platform else self.tenant

    def ungrantable(self, scopes: Iterable[str]) -> list[str]:
        """The scopes of ``scopes`` this caller may not give a client, sorted."""
        if self.platform:
            return []
        return sorted({s for s in scopes if s == PLATFORM_ADMIN or s not in self.principal.scopes})
