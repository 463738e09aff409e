"""Prompt templates as immutable, content-addressed versions, selected per tenant.

A version is (name, version number, template, parameters); its digest is the SHA-256 of the
canonical JSON of name, template and parameters. Publishing a template whose digest is already
stored for the same owner returns that version; anything else becomes the next version number
of the name (numbers are shared by every owner, so ``answer@4`` means one thing mesh-wide). A
stored version is never changed.

Owners: platform versions (tenant "") are seeded from ``seeds/*.toml`` on start-up and
published by platform operators; every tenant may select them. A tenant's own versions are
visible and selectable only by that tenant.

Selection: the version a tenant uses is its own selection, else the platform's ("" row), else
the newest platform version. Each selection row has a stable version and, while a release of
it runs a canary (services.router.releases), a candidate and its weight: the candidate serves
the sessions the sticky assignment gives it. Every replica sees a publication, a selection or
a release step within ``cache_s``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import string
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    DateTime,
    Integer,
    String,
    Text,
    UniqueConstraint,
    func,
    or_,
    select,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Mapped, mapped_column

from services.router.notes import Base
from services.router.releases.model import UnitKey, UnitKind, on_candidate

ROUTE_SYSTEM = "route-system"
ANSWER = "answer"
SEED_DIR = Path(__file__).with_name("seeds")
MAX_TEMPLATE_CHARS = 16_000
MAX_PARAMS_CHARS = 4096
SEED_AUTHOR = "seed"
_PUBLISH_ATTEMPTS = 5


@dataclass(frozen=True)
class PromptKind:
    """What the router expects of a prompt name: its placeholders and parameters."""

    placeholders: frozenset[str]
    # Parameter name -> check (True when the value is acceptable) and its description.
    params: Mapping[str, tuple[Callable[[Any], bool], str]]


def _fraction(value: Any) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and 0 < value <= 1
    )


KINDS: dict[str, PromptKind] = {
    # The routing system prompt; $tools is the list of offered tools (name: description).
    ROUTE_SYSTEM: PromptKind(
        frozenset({"tools"}),
        {"intent_without_logprobs": (_fraction, "a number in (0, 1]")},
    ),
    # The answer prompt; $tool_name is the tool whose result is phrased.
    ANSWER: PromptKind(frozenset({"tool_name"}), {}),
}
# I of a routing prompt version that sets no intent_without_logprobs.
DEFAULT_INTENT_WITHOUT_LOGPROBS = 0.7


class PromptRow(Base):
    __tablename__ = "router_prompts"
    __table_args__ = (
        UniqueConstraint("name", "version", name="uq_router_prompts_version"),
        UniqueConstraint("tenant", "name", "digest", name="uq_router_prompts_digest"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    # "" for a platform version.
    tenant: Mapped[str] = mapped_column(String(128))
    digest: Mapped[str] = mapped_column(String(64))
    template: Mapped[str] = mapped_column(Text)
    params_json: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    created_by: Mapped[str] = mapped_column(String(256))


class PromptSelectionRow(Base):
    __tablename__ = "router_prompt_selections"

    # "" is the platform's selection, for tenants without their own.
    tenant: Mapped[str] = mapped_column(String(128), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    stable_version: Mapped[int] = mapped_column(Integer)
    # Reserved for releases (issue 13): a candidate version and its share of traffic.
    candidate_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    candidate_weight: Mapped[int] = mapped_column(Integer, server_default="0")
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_by: Mapped[str] = mapped_column(String(256))


@dataclass(frozen=True)
class Prompt:
    name: str
    version: int
    tenant: str
    digest: str
    template: str
    params: Mapping[str, Any]
    created_at: datetime
    created_by: str

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def render(self, **values: str) -> str:
        """The template with its placeholders filled (an unknown $name stays as written)."""
        return string.Template(self.template).safe_substitute(values)

    @classmethod
    def from_row(cls, row: PromptRow) -> Prompt:
        created = row.created_at
        if created.tzinfo is None:  # SQLite hands back naive datetimes, written in UTC
            created = created.replace(tzinfo=UTC)
        return cls(
            name=row.name,
            version=row.version,
            tenant=row.tenant,
            digest=row.digest,
            template=row.template,
            params=json.loads(row.params_json or "{}"),
            created_at=created,
            created_by=row.created_by,
        )


@dataclass(frozen=True)
class Selection:
    """A selection row as the request path reads it: whose it is, the stable version, and the
    candidate serving ``weight`` percent of sessions (None: no canary)."""

    owner: str
    stable: int
    candidate: int | None
    weight: int


class PromptError(ValueError):
    """A publication or selection the router refuses; ``field`` names what was wrong."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class PromptNotFoundError(LookupError):
    pass


def digest(name: str, template: str, params: Mapping[str, Any]) -> str:
    canonical = json.dumps(
        {"name": name, "template": template, "params": params},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def check(name: str, template: str, params_json: str) -> dict[str, Any]:
    """The parsed parameters of a valid publication, else PromptError naming the field."""
    kind = KINDS.get(name)
    if kind is None:
        raise PromptError("name", f"one of {', '.join(sorted(KINDS))}")
    if not template.strip() or len(template) > MAX_TEMPLATE_CHARS:
        raise PromptError("template", f"1 to {MAX_TEMPLATE_CHARS} characters")
    try:
        names = set(string.Template(template).get_identifiers())
    except ValueError:
        names = set()
    if not string.Template(template).is_valid():
        raise PromptError("template", "a '$' must start a placeholder or be written '$$'")
    unknown = names - kind.placeholders
    if unknown:
        allowed = ", ".join(f"${p}" for p in sorted(kind.placeholders)) or "none"
        raise PromptError(
            "template", f"unknown placeholder ${sorted(unknown)[0]} (allowed: {allowed})"
        )
    if len(params_json) > MAX_PARAMS_CHARS:
        raise PromptError("params_json", f"at most {MAX_PARAMS_CHARS} characters")
    try:
        params = json.loads(params_json) if params_json.strip() else {}
    except ValueError:
        raise PromptError("params_json", "is not valid JSON") from None
    if not isinstance(params, dict):
        raise PromptError("params_json", "must be a JSON object")
    for key, value in params.items():
        rule = kind.params.get(key)
        if rule is None:
            known = ", ".join(sorted(kind.params)) or "none"
            raise PromptError(f"params_json.{key}", f"unknown parameter (known: {known})")
        ok, description = rule
        if not ok(value):
            raise PromptError(f"params_json.{key}", description)
    return params


@dataclass(frozen=True)
class Seed:
    name: str
    template: str
    params: dict[str, Any]


def load_seeds(directory: Path = SEED_DIR) -> list[Seed]:
    """Every ``<dir>/*.toml`` (name, template, optional [params]), checked like a publication."""
    seeds = []
    for path in sorted(directory.glob("*.toml")):
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        name, template = str(data.get("name", "")), str(data.get("template", ""))
        try:
            params = check(name, template, json.dumps(data.get("params", {})))
        except PromptError as error:
            raise ValueError(f"prompt seed {path}: {error}") from None
        seeds.append(Seed(name, template, params))
    missing = set(KINDS) - {seed.name for seed in seeds}
    if missing:
        raise ValueError(f"no prompt seed for {sorted(missing)} in {directory}")
    return seeds


class PromptStore:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        *,
        cache_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sessions = sessions
        self._cache_s = cache_s
        self._clock = clock
        self._selected: dict[tuple[str, str], tuple[float, Selection | None]] = {}
        # Versions never change: kept once read.
        self._versions: dict[tuple[str, str, int], Prompt] = {}

    async def publish(
        self, name: str, template: str, params: Mapping[str, Any], *, tenant: str, by: str
    ) -> tuple[Prompt, bool]:
        """Store a version (or find the same content of the same owner); (prompt, created)."""
        key = digest(name, template, params)
        for _ in range(_PUBLISH_ATTEMPTS):
            existing = await self._by_digest(tenant, name, key)
            if existing is not None:
                return existing, False
            async with self._sessions() as session:
                latest = await session.scalar(
                    select(func.max(PromptRow.version)).where(PromptRow.name == name)
                )
            row = PromptRow(
                name=name,
                version=(latest or 0) + 1,
                tenant=tenant,
                digest=key,
                template=template,
                params_json=json.dumps(params, sort_keys=True),
                created_at=datetime.now(UTC),
                created_by=by,
            )
            try:
                async with self._sessions() as session, session.begin():
                    session.add(row)
            except IntegrityError:
                continue  # another replica took the number (or stored the same content)
            return Prompt.from_row(row), True
        raise RuntimeError(f"could not publish {name}: the version number kept being taken")

    async def _by_digest(self, tenant: str, name: str, key: str) -> Prompt | None:
        async with self._sessions() as session:
            row = await session.scalar(
                select(PromptRow).where(
                    PromptRow.tenant == tenant, PromptRow.name == name, PromptRow.digest == key
                )
            )
        return Prompt.from_row(row) if row is not None else None

    async def select(self, tenant: str, name: str, version: int, *, by: str) -> Prompt:
        """Make ``version`` the stable one of ``tenant`` ("" for the platform's default)."""
        prompt = await self.get(tenant, name, version)
        async with self._sessions() as session, session.begin():
            row = await session.get(PromptSelectionRow, (tenant, name))
            if row is None:
                session.add(
                    PromptSelectionRow(
                        tenant=tenant,
                        name=name,
                        stable_version=version,
                        candidate_weight=0,
                        updated_at=datetime.now(UTC),
                        updated_by=by,
                    )
                )
            else:
                row.stable_version = version
                row.updated_at = datetime.now(UTC)
                row.updated_by = by
        self._selected.clear()
        return prompt

    async def get(self, tenant: str, name: str, version: int) -> Prompt:
        """A version ``tenant`` may see (its own or a platform one), else PromptNotFoundError."""
        async with self._sessions() as session:
            row = await session.scalar(
                select(PromptRow).where(
                    PromptRow.name == name,
                    PromptRow.version == version,
                    PromptRow.tenant.in_(["", tenant]),
                )
            )
        if row is None:
            raise PromptNotFoundError(f"prompt {name} has no version {version}")
        return Prompt.from_row(row)

    async def versions(self, tenant: str, name: str = "") -> list[Prompt]:
        query = select(PromptRow).where(or_(PromptRow.tenant == "", PromptRow.tenant == tenant))
        if name:
            query = query.where(PromptRow.name == name)
        async with self._sessions() as session:
            rows = (await session.scalars(query.order_by(PromptRow.name, PromptRow.version))).all()
        return [Prompt.from_row(row) for row in rows]

    async def selected(self, tenant: str, name: str, session: str = "") -> Prompt:
        """The version ``tenant`` uses now for ``session`` (the selection is cached for
        ``cache_s``; under a canary the candidate serves the sessions assigned to it)."""
        cached = self._selected.get((tenant, name))
        if cached is not None and self._clock() - cached[0] < self._cache_s:
            selection = cached[1]
        else:
            selection = await self._selection(tenant, name)
            self._selected[(tenant, name)] = (self._clock(), selection)
        if selection is None:
            return await self._newest_platform(name)
        version = selection.stable
        if selection.candidate is not None and on_candidate(
            UnitKey(UnitKind.PROMPT, selection.owner, name),
            str(selection.candidate),
            selection.weight,
            tenant,
            session,
        ):
            version = selection.candidate
        key = (tenant, name, version)
        prompt = self._versions.get(key)
        if prompt is None:
            prompt = self._versions[key] = await self.get(tenant, name, version)
        return prompt

    async def _selection(self, tenant: str, name: str) -> Selection | None:
        async with self._sessions() as session:
            rows = (
                await session.scalars(
                    select(PromptSelectionRow).where(
                        PromptSelectionRow.name == name,
                        PromptSelectionRow.tenant.in_(["", tenant]),
                    )
                )
            ).all()
        chosen = {row.tenant: row for row in rows}
        row = chosen.get(tenant, chosen.get(""))
        if row is None:
            return None
        return Selection(
            row.tenant, row.stable_version, row.candidate_version, row.candidate_weight
        )

    async def _newest_platform(self, name: str) -> Prompt:
        async with self._sessions() as session:
            row = await session.scalar(
                select(PromptRow)
                .where(PromptRow.name == name, PromptRow.tenant == "")
                .order_by(PromptRow.version.desc())
                .limit(1)
            )
        if row is None:
            raise PromptNotFoundError(f"no version of prompt {name} is stored")
        return Prompt.from_row(row)

    async def pin(self, owner: str, name: str, *, by: str) -> int:
        """The stable version of ``owner``'s own selection, made from the version it uses now
        when it has none yet (a release needs a stable version of its own to return to)."""
        async with self._sessions() as session:
            row = await session.get(PromptSelectionRow, (owner, name))
        if row is not None:
            return row.stable_version
        current = await self.selected(owner, name) if owner else await self._newest_platform(name)
        with contextlib.suppress(IntegrityError):
            await self.select(owner, name, current.version, by=by)
        async with self._sessions() as session:
            row = await session.get(PromptSelectionRow, (owner, name))
        assert row is not None
        return row.stable_version

    def forget(self) -> None:
        """Read the selections again at the next request (after a change made here)."""
        self._selected.clear()

    async def seed(self, seeds: list[Seed]) -> None:
        """Publish each seed as a platform version (once per content); a name without a
        platform selection yet (a fresh install) selects it. A changed seed in a later release
        becomes a new version that an operator selects (or releases) when ready."""
        for seed in seeds:
            prompt, _ = await self.publish(
                seed.name, seed.template, seed.params, tenant="", by=SEED_AUTHOR
            )
            async with self._sessions() as session:
                chosen = await session.get(PromptSelectionRow, ("", seed.name))
            if chosen is None:
                # Another replica may select its seed first: the first selection stands.
                with contextlib.suppress(IntegrityError):
                    await self.select("", seed.name, prompt.version, by=SEED_AUTHOR)
