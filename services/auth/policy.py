"""The versioned authorization policy file, reloaded when it changes on disk."""

from __future__ import annotations

import logging
import os
import time
import tomllib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

log = logging.getLogger("toolmesh.auth.policy")

NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,62}$"
SCOPE_PATTERN = r"^[a-z][a-z0-9_.:-]{0,63}$"


class TenantRules(BaseModel):
    model_config = ConfigDict(extra="forbid")

    allowed_tools: list[str] = Field(default_factory=list)


class Policy(BaseModel):
    """What the file holds; unknown keys are refused so a typo cannot silently drop a rule."""

    model_config = ConfigDict(extra="forbid")

    version: str = Field(min_length=1, max_length=64)
    roles: dict[str, list[str]] = Field(default_factory=dict)
    tenants: dict[str, TenantRules] = Field(default_factory=dict)

    def role_scopes(self, roles: list[str]) -> set[str]:
        granted: set[str] = set()
        for role in roles:
            granted.update(self.roles.get(role, ()))
        return granted


def load_policy(path: Path) -> Policy:
    with path.open("rb") as handle:
        return Policy.model_validate(tomllib.load(handle))


class PolicySource:
    """Serves the policy in force, re-reading the file when its mtime changes.

    The mtime is checked at most every ``check_interval_s`` so a busy GetPolicy does not stat
    the file per call. A file that fails to parse keeps the previous policy and logs an error
    once per change, so a bad edit never takes authorization down.
    """

    def __init__(self, path: Path, check_interval_s: float) -> None:
        self._path = path
        self._interval = check_interval_s
        # A broken file at start-up is fatal: there is no previous policy to keep.
        self._policy = load_policy(path)
        self._seen = self._stamp()
        self._checked = time.monotonic()

    def _stamp(self) -> tuple[int, int]:
        stat = os.stat(self._path)
        return (stat.st_mtime_ns, stat.st_size)

    def current(self) -> Policy:
        now = time.monotonic()
        if now - self._checked < self._interval:
            return self._policy
        self._checked = now
        try:
            stamp = self._stamp()
        except OSError as error:
            log.error(
                "policy file unreadable, keeping version %s",
                self._policy.version,
                extra={"path": str(self._path), "error": error.strerror},
            )
            return self._policy
        if stamp == self._seen:
            return self._policy
        self._seen = stamp
        try:
            policy = load_policy(self._path)
        except (OSError, tomllib.TOMLDecodeError, ValidationError) as error:
            log.error(
                "policy file invalid, keeping version %s",
                self._policy.version,
                extra={"path": str(self._path), "error": str(error)[:500]},
            )
            return self._policy
        if policy.version != self._policy.version:
            log.info(
                "policy reloaded",
                extra={"version": policy.version, "previous": self._policy.version},
            )
        self._policy = policy
        return policy
