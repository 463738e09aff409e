"""The authorization policy: the file that seeds a fresh install, and the policy in force.

The policy in force lives in auth's database (services.auth.policy_store): tenants, their
tool allowlists and the roles, changed through the admin RPCs, each change a new version
number. The file (services/auth/policy.toml, or setting policy_file) is read once, when the
database holds no policy yet, and imported as version 1; later edits of the file are ignored.
"""

from __future__ import annotations

import logging
import re
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator

from services.kit.allowlist import entry_problem

log = logging.getLogger("toolmesh.auth.policy")

NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,62}$"
SCOPE_PATTERN = r"^[a-z][a-z0-9_.:-]{0,63}$"


class TenantRules(BaseModel):
    model_config = ConfigDict(extra="forbid")

    allowed_tools: list[str] = Field(default_factory=list)

    @field_validator("allowed_tools")
    @classmethod
    def _entries(cls, tools: list[str]) -> list[str]:
        for tool in tools:
            problem = entry_problem(tool)
            if problem:
                raise ValueError(f"allowed_tools entry {tool!r}: {problem}")
        return tools


class Policy(BaseModel):
    """What the seed file holds; unknown keys are refused so a typo cannot silently drop a
    rule."""

    model_config = ConfigDict(extra="forbid")

    version: str = Field(min_length=1, max_length=64)
    roles: dict[str, list[str]] = Field(default_factory=dict)
    tenants: dict[str, TenantRules] = Field(default_factory=dict)

    @field_validator("roles", "tenants")
    @classmethod
    def _names(cls, table: dict[str, object]) -> dict[str, object]:
        """The names the admin RPCs accept, so a seeded name can be managed later."""
        for name in table:
            if not re.fullmatch(NAME_PATTERN, name):
                raise ValueError(f"{name!r}: lower-case letters, digits, '_', '.', '-'")
        return table


def load_policy(path: Path) -> Policy:
    with path.open("rb") as handle:
        return Policy.model_validate(tomllib.load(handle))


@dataclass(frozen=True)
class PolicyInForce:
    """The policy as the database holds it at one version."""

    number: int
    roles: Mapping[str, Sequence[str]] = field(default_factory=dict)
    tenants: Mapping[str, Sequence[str]] = field(default_factory=dict)

    @property
    def version(self) -> str:
        """The version as verifiers log it: the decimal number."""
        return str(self.number)

    def role_scopes(self, roles: Sequence[str]) -> set[str]:
        granted: set[str] = set()
        for role in roles:
            granted.update(self.roles.get(role, ()))
        return granted


class PolicyReader(Protocol):
    async def version(self) -> int: ...

    async def read(self) -> PolicyInForce: ...


class PolicySource:
    """This replica's copy of the policy in force, re-read when the database's version moves.

    ``fresh`` checks the version (one indexed read) at most every ``check_interval_s``, or
    always with ``force`` (GetPolicy, so gateways see a change at their next refresh, and after
    a change made here). A failed check keeps the copy and logs; ``force`` raises instead, so
    GetPolicy never passes off an unchecked copy as current.
    """

    def __init__(self, store: PolicyReader, check_interval_s: float) -> None:
        self._store = store
        self._interval = check_interval_s
        self._policy = PolicyInForce(0)
        self._checked = -float("inf")

    def current(self) -> PolicyInForce:
        return self._policy

    async def fresh(self, *, force: bool = False) -> PolicyInForce:
        now = time.monotonic()
        if not force and now - self._checked < self._interval:
            return self._policy
        try:
            number = await self._store.version()
            if number != self._policy.number:
                policy = await self._store.read()
                if policy.number != self._policy.number:
                    log.info(
                        "policy loaded",
                        extra={"version": policy.version, "previous": self._policy.version},
                    )
                self._policy = policy
        except Exception:
            if force:
                raise
            log.exception("policy check failed, keeping version %s", self._policy.version)
        self._checked = now
        return self._policy
