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


def _open(schema: Any) -> bool:
    return schema in ({}, True)


def input_narrowed(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    """True unless every argument object the old input schema accepted is (visibly) still
    accepted by the new one. Conservative: a change it cannot judge counts as narrowing."""
    if old == new:
        return False
    keys = (set(old) | set(new)) - {
        "properties",
        "required",
        "additionalProperties",
        "description",
        "title",
        "$schema",
    }
    if any(old.get(k) != new.get(k) for k in keys):
        return True
    old_props: Mapping[str, Any] = old.get("properties", {})
    new_props: Mapping[str, Any] = new.get("properties", {})
    for name, schema in old_props.items():
        if name not in new_props or (new_props[name] != schema and not _open(new_props[name])):
            return True
    if not set(new.get("required", [])) <= set(old.get("required", [])):
        return True
    old_extra = old.get("additionalProperties", True)
    new_extra = new.get("additionalProperties", True)
    if old_extra != new_extra and not _open(new_extra):
        return True
    # A new property that restricts what the old schema let through as an extra.
    return any(
        old_extra is not False and not _open(schema)
        for name, schema in new_props.items()
        if name not in old_props
    )


def release_key(version: str) -> tuple[int, int, int]:
    match = _RELEASE.match(version)
    if match is None:
        raise ValueError(f"{version!r} is not a release version (MAJOR.MINOR.PATCH)")
    major, minor, patch = match.groups()
    return int(major), int(minor), int(patch)


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
    breaking = []
    if pending.side_effect is not latest.side_effect:
        breaking.append("its side effect changed")
    if input_narrowed(latest.input_schema, pending.input_schema):
        breaking.append("its input schema accepts less")
    if breaking and wanted[0] <= current[0]:
        return (
            f"must be a new major version ({current[0] + 1}.0.0 or above): {' and '.join(breaking)}"
        )
    return None


def human_size(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    if size < 1024 * 1024:
        return f"{size / 1024:.1f} KB"
    return f"{size / (1024 * 1024):.1f} MB"
