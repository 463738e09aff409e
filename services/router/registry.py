"""Tool contracts and the registry that holds them.

A contract (name, semver, schemas, side effect, cost, timeout, fallback) is data; the
implementation is an async callable bound to it. A published name+version never changes: the
registry refuses a second, different contract for the same version, and ``contracts.lock.json``
pins the fingerprint of every released version so an edit without a version bump fails at start.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from jsonschema.protocols import Validator

from services.kit.allowlist import tool_allowed
from services.router.notes import NotesStore

LOCK_FILE = Path(__file__).with_name("contracts.lock.json")

_SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-([0-9A-Za-z.-]+))?$")


class SideEffect(StrEnum):
    READ_ONLY = "read_only"
    WRITE = "write"


class ToolInputError(Exception):
    """The arguments are well-formed but unusable (unknown zone, division by zero, ...)."""


class ToolConflictError(Exception):
    """The call conflicts with stored state (an idempotency key reused for other content)."""


@dataclass(frozen=True)
class ToolContext:
    """What a tool may know about the call besides its arguments."""

    tenant: str
    session_id: str
    request_id: str
    idempotency_key: str
    notes: NotesStore
    # The wall clock tools read (injected by tests and the routing corpus for exact answers).
    now: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))


@dataclass(frozen=True)
class ToolOutput:
    answer: str
    # The structured result; None when the tool returned none (backend tools without an
    # output schema, or a tool error).
    result: dict[str, Any] | None
    # True when a write tool found its idempotency key already used and wrote nothing.
    replayed: bool = False
    # True when the tool ran and declined this input (MCP isError, ToolService is_error):
    # the answer says why; no result is checked or returned.
    tool_error: bool = False


ToolFn = Callable[[dict[str, Any], ToolContext], Awaitable[ToolOutput]]

_EXPECTATIONS = ("result", "answer", "answer_contains", "refused")


class ExampleError(ValueError):
    """An example that does not say what it expects (or says it badly)."""


@dataclass(frozen=True)
class Example:
    """A call a tool version must answer as stated. Declared with the version (built-in
    tools) or supplied when a release starts (backend tools); the release gate runs every
    example against the candidate through the real Executor before any traffic reaches it.

    Exactly one expectation: ``result`` (every key given equals the result's), ``answer``
    (the whole answer text), ``answer_contains`` (a piece of it), or ``refused`` (the tool
    declines these arguments).
    """

    arguments: Mapping[str, Any]
    result: Mapping[str, Any] | None = None
    answer: str | None = None
    answer_contains: str | None = None
    refused: bool = False

    def __post_init__(self) -> None:
        given = [name for name in _EXPECTATIONS if (getattr(self, name) not in (None, False))]
        if len(given) != 1:
            raise ExampleError(f"give exactly one of {', '.join(_EXPECTATIONS)}")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Example:
        if not isinstance(data, Mapping):
            raise ExampleError("an example is a JSON object")
        unknown = set(data) - {"arguments", *_EXPECTATIONS}
        if unknown:
            raise ExampleError(f"unknown key {sorted(unknown)[0]!r}")
        arguments = data.get("arguments", {})
        result = data.get("result")
        if not isinstance(arguments, Mapping) or not isinstance(result, Mapping | None):
            raise ExampleError("arguments and result are JSON objects")
        for name in ("answer", "answer_contains"):
            if not isinstance(data.get(name), str | None):
                raise ExampleError(f"{name} is a string")
        if not isinstance(data.get("refused", False), bool):
            raise ExampleError("refused is true or false")
        return cls(
            arguments=arguments,
            result=result,
            answer=data.get("answer"),
            answer_contains=data.get("answer_contains"),
            refused=data.get("refused", False),
        )

    def problem(self, output: ToolOutput | None, refusal: str = "") -> str | None:
        """Why the tool's answer (``output``, or ``refusal`` when it declined) does not match
        this example; None when it does."""
        if self.refused:
            if output is None or output.tool_error:
                return None
            return f"expected a refusal, got the answer {output.answer[:80]!r}"
        if output is None or output.tool_error:
            reason = refusal or (output.answer if output else "")
            return f"the tool declined: {reason[:160]}"
        if self.answer is not None and output.answer != self.answer:
            return f"expected the answer {self.answer[:80]!r}, got {output.answer[:80]!r}"
        if self.answer_contains is not None and self.answer_contains not in output.answer:
            return f"expected the answer to contain {self.answer_contains[:80]!r}"
        if self.result is not None:
            got = output.result or {}
            for key, value in self.result.items():
                if key not in got or got[key] != value:
                    shown = json.dumps(got.get(key))[:60] if key in got else "nothing"
                    return f"expected result {key} = {json.dumps(value)[:60]}, got {shown}"
        return None


@dataclass(frozen=True)
class ToolSpec:
    """One published tool version; everything but ``max_concurrency`` is the contract."""

    name: str
    version: str
    description: str
    input_schema: Mapping[str, Any]
    output_schema: Mapping[str, Any]
    side_effect: SideEffect
    cost_units: int
    timeout_ms: int
    fallback_answer: str
    # Operational limit, not part of the contract: calls beyond it are refused at once.
    max_concurrency: int = 32
    # Calls this version must answer as stated (the release gate runs them); declared with
    # the version, not part of the contract's fingerprint.
    examples: tuple[Example, ...] = field(default=(), compare=False)

    def fingerprint(self) -> str:
        contract = {
            "name": self.name,
            "version": self.version,
            "description": self.description,
            "input_schema": self.input_schema,
            "output_schema": self.output_schema,
            "side_effect": self.side_effect.value,
            "cost_units": self.cost_units,
            "timeout_ms": self.timeout_ms,
            "fallback_answer": self.fallback_answer,
        }
        canonical = json.dumps(contract, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class ToolOrigin:
    """Where a backend tool runs (built-in tools have none)."""

    backend: str
    # services.router.backends.config.Kind value: "mcp_stdio", "mcp_http" or "grpc".
    kind: str
    # Owning tenant; "" for a shared backend.
    tenant: str
    # SHA-256 of the published contract as discovered (services.router.backends.contracts).
    fingerprint: str


@dataclass(frozen=True)
class Tool:
    spec: ToolSpec
    run: ToolFn
    input_validator: Validator = field(compare=False)
    output_validator: Validator = field(compare=False)
    origin: ToolOrigin | None = field(default=None, compare=False)

    @property
    def key(self) -> str:
        return f"{self.spec.name}@{self.spec.version}"

    @property
    def limit_key(self) -> str:
        """Key of the tool's concurrency limit and breaker: backend names are per tenant."""
        if self.origin is None:
            return self.key
        return f"{self.origin.tenant or '_platform'}/{self.key}"

    @property
    def backend_key(self) -> str | None:
        """Key of the breaker of the tool's backend (None for built-in tools)."""
        if self.origin is None:
            return None
        return f"{self.origin.tenant or '_platform'}/{self.origin.backend}"


def semver_key(version: str) -> tuple[int, int, int, int, str]:
    """Sort key for semantic versions: a pre-release sorts before its release."""
    match = _SEMVER.match(version)
    if match is None:
        raise ValueError(f"{version!r} is not a semantic version")
    major, minor, patch, pre = match.groups()
    return (int(major), int(minor), int(patch), 0 if pre else 1, pre or "")


class RegistryError(ValueError):
    """A contract is malformed or contradicts one already published."""


class Registry:
    def __init__(self) -> None:
        self._tools: dict[tuple[str, str], Tool] = {}

    def register(self, spec: ToolSpec, run: ToolFn) -> Tool:
        """Add a tool version; the same contract again is a no-op, a different one an error."""
        if not _SEMVER.match(spec.version):
            raise RegistryError(f"{spec.name}: version {spec.version!r} is not semantic")
        if not re.fullmatch(r"[a-z][a-z0-9_]{0,63}", spec.name):
            raise RegistryError(f"tool name {spec.name!r} must be lower_snake_case")
        if spec.timeout_ms <= 0 or spec.cost_units < 0 or spec.max_concurrency < 1:
            raise RegistryError(
                f"{spec.name}@{spec.version}: timeout, cost or concurrency out of range"
            )
        for schema in (spec.input_schema, spec.output_schema):
            try:
                Draft202012Validator.check_schema(schema)
            except SchemaError as error:
                raise RegistryError(
                    f"{spec.name}@{spec.version}: invalid JSON Schema: {error.message}"
                ) from None
        existing = self._tools.get((spec.name, spec.version))
        if existing is not None:
            if existing.spec.fingerprint() != spec.fingerprint():
                raise RegistryError(
                    f"{spec.name}@{spec.version} is already published with a different contract; "
                    "publish a new version instead"
                )
            return existing
        tool = Tool(
            spec=spec,
            run=run,
            input_validator=Draft202012Validator(spec.input_schema),
            output_validator=Draft202012Validator(spec.output_schema),
        )
        self._tools[(spec.name, spec.version)] = tool
        return tool

    def get(self, name: str, version: str) -> Tool | None:
        return self._tools.get((name, version))

    def has_name(self, name: str) -> bool:
        return any(n == name for n, _ in self._tools)

    def latest(self, name: str) -> Tool | None:
        """The highest released (non pre-release) version, which routing offers."""
        released = [tool for (n, v), tool in self._tools.items() if n == name and "-" not in v]
        return max(released, key=lambda t: semver_key(t.spec.version), default=None)

    def all(self) -> list[Tool]:
        return sorted(self._tools.values(), key=lambda t: (t.spec.name, semver_key(t.spec.version)))

    def fingerprints(self) -> dict[str, str]:
        return {tool.key: tool.spec.fingerprint() for tool in self.all()}

    def check_published(self, lock: Mapping[str, str]) -> None:
        """Refuse a registry whose released versions differ from the pinned fingerprints."""
        changed = sorted(
            key
            for key, digest in self.fingerprints().items()
            if key in lock and lock[key] != digest
        )
        if changed:
            raise RegistryError(
                f"published tool contracts changed without a new version: {', '.join(changed)}"
            )


def load_lock(path: Path = LOCK_FILE) -> dict[str, str]:
    data = json.loads(path.read_text(encoding="utf-8"))
    return {str(k): str(v) for k, v in data.items()}


def is_allowed(name: str, allowed: Iterable[str]) -> bool:
    """Deny by default (services.kit.allowlist: names, "<backend>.*", or "*")."""
    return tool_allowed(name, allowed)
