"""Contracts of backend tools: what discovery found, its fingerprint, how it may change.

A discovered contract is name, title, description, input and output schema, annotations and the
effective side effect. Its fingerprint (SHA-256 of the canonical JSON) identifies it; the
version is the label it was published under. A published version never changes: discovery
that finds another fingerprint under the tool's name records it as PENDING (drift) and the
published one stays pinned until an operator approves the new one as a higher version.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from services.router.compat import breaking_changes
from services.router.registry import SideEffect

FIRST_VERSION = "1.0.0"
# Release versions only: an approved contract is served, and routing ignores pre-releases.
_RELEASE = re.compile(r"^(0|[1-9]\d{0,5})\.(0|[1-9]\d{0,5})\.(0|[1-9]\d{0,5})$")
# Names a backend may give its tools (MCP and toolmesh.tool.v1 alike).
TOOL_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
# A description or schema beyond this is refused at discovery (the tool is skipped, logged).
MAX_DESCRIPTION_CHARS = 8192
MAX_SCHEMA_CHARS = 65536
CONTRACT_FIELDS = ("title", "description", "input_schema", "output_schema", "annotations")


@dataclass(frozen=True)
class DiscoveredTool:
    """One tool as a backend described it, with the side effect toolmesh gives it."""

    name: str
    description: str
    input_schema: Mapping[str, Any]
    # None when the tool declares no structured result.
    output_schema: Mapping[str, Any] | None
    side_effect: SideEffect
    title: str = ""
    annotations: Mapping[str, Any] = field(default_factory=dict)

    def canonical(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "description": self.description,
            "input_schema": self.input_schema,
            "output_schema": self.output_schema,
            "annotations": self.annotations,
            "side_effect": self.side_effect.value,
        }

    def fingerprint(self) -> str:
        text = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def to_json(self) -> str:
        return json.dumps(self.canonical(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DiscoveredTool:
        data = json.loads(text)
        return cls(
            name=data["name"],
            title=data.get("title", ""),
            description=data["description"],
            input_schema=data["input_schema"],
            output_schema=data["output_schema"],
            annotations=data.get("annotations", {}),
            side_effect=SideEffect(data["side_effect"]),
        )


def side_effect_of(read_only_hint: bool | None, override: str | None) -> SideEffect:
    """The operator's classification wins; else read-only only when the backend says so
    explicitly (a missing or false hint is write)."""
    if override:
        return SideEffect(override)
    return SideEffect.READ_ONLY if read_only_hint is True else SideEffect.WRITE


def changed_fields(old: DiscoveredTool, new: DiscoveredTool) -> list[str]:
    before, after = old.canonical(), new.canonical()
    return [name for name in (*CONTRACT_FIELDS, "side_effect") if before[name] != after[name]]


def release_key(version: str) -> tuple[int, int, int]:
    match = _RELEASE.match(version)
    if match is None:
        raise ValueError(f"{version!r} is not a release version (MAJOR.MINOR.PATCH)")
    major, minor, patch = match.groups()
    return int(major), int(minor), int(patch)


def contract_breaks(old: DiscoveredTool, new: DiscoveredTool) -> list[str]:
    """How ``new`` breaks callers of ``old`` (services.router.compat, the one rule)."""
    return breaking_changes(
        old_input=old.input_schema,
        new_input=new.input_schema,
        old_output=old.output_schema,
        new_output=new.output_schema,
        old_side_effect=old.side_effect.value,
        new_side_effect=new.side_effect.value,
    )


def approval_problem(
    version: str, latest_version: str, latest: DiscoveredTool, pending: DiscoveredTool
) -> str | None:
    """Why ``pending`` may not be published as ``version`` after ``latest``, or None."""
    try:
        wanted = release_key(version)
    except ValueError as error:
        return str(error)
    current = release_key(latest_version)
    if wanted <= current:
        return f"must be above the latest published version {latest_version}"
    breaking = contract_breaks(latest, pending)
    if breaking and wanted[0] <= current[0]:
        return f"must be a new major version ({current[0] + 1}.0.0 or above): {'; '.join(breaking)}"
    return None


def human_size(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    if size < 1024 * 1024:
        return f"{size / 1024:.1f} KB"
    return f"{size / (1024 * 1024):.1f} MB"
