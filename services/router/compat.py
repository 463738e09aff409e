"""Contract compatibility: what a new version of a tool may change without breaking its callers.

One rule, used by the backend approval (services.router.backends.contracts) and the release
gate (services.router.releases.gates). A change is breaking when the new version

- changes the side effect (read-only <-> write),
- accepts less input: adds a required property, removes a property, narrows one (a lower
  maximum, a new pattern, fewer types or enum values ...), or stops accepting extra ones,
- promises less output: removes a result property, stops always returning one, or widens
  what one may hold (callers parse it).

Judging JSON Schema containment in general is undecidable in practice, so the rule is
conservative: a change it cannot judge counts as breaking, and only relaxations it can see
(a removed or loosened keyword, a wider type or enum, a constraint that applies only to a
type the old schema did not accept) pass.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Keywords that describe rather than constrain.
_ANNOTATIONS = frozenset(
    {"description", "title", "examples", "default", "$comment", "deprecated", "$schema"}
)
# Bounds that may only grow, and those that may only shrink, for the new schema to accept
# at least what the old one did.
_UPPER = frozenset({"maxLength", "maximum", "exclusiveMaximum", "maxItems", "maxProperties"})
_LOWER = frozenset({"minLength", "minimum", "exclusiveMinimum", "minItems", "minProperties"})
# Keywords that constrain values of one JSON type only.
_TYPED = {
    "string": frozenset({"minLength", "maxLength", "pattern", "format"}),
    "number": frozenset(
        {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"}
    ),
    "array": frozenset({"items", "minItems", "maxItems", "uniqueItems", "prefixItems"}),
    "object": frozenset(
        {"properties", "required", "additionalProperties", "minProperties", "maxProperties"}
    ),
}
_ALL_TYPES = frozenset({"string", "number", "integer", "boolean", "object", "array", "null"})


def _open(schema: Any) -> bool:
    return schema in ({}, True)


def _types(schema: Mapping[str, Any]) -> frozenset[str]:
    declared = schema.get("type")
    if declared is None:
        return _ALL_TYPES
    names = frozenset([declared] if isinstance(declared, str) else declared)
    # Every integer is a number.
    return names | {"integer"} if "number" in names else names


def _inert(keyword: str, old_types: frozenset[str]) -> bool:
    """A keyword the new schema adds that cannot refuse anything the old schema accepted,
    because it constrains only a type the old schema refused anyway."""
    for type_name, keywords in _TYPED.items():
        if keyword in keywords:
            applies = {type_name, "integer"} if type_name == "number" else {type_name}
            return not (old_types & applies)
    return False


def narrowed(old: Any, new: Any) -> bool:
    """True unless every value ``old`` accepts is (visibly) still accepted by ``new``."""
    if old == new or _open(new):
        return False
    if not isinstance(old, Mapping) or not isinstance(new, Mapping):
        return True
    old_types = _types(old)
    for key in set(new) - _ANNOTATIONS:
        if key not in old:
            if not _inert(key, old_types):
                return True
            continue
        before, after = old[key], new[key]
        if before == after:
            continue
        if key == "type":
            if not old_types <= _types(new):
                return True
        elif key == "enum":
            if not isinstance(after, list) or not all(v in after for v in before):
                return True
        elif key in _UPPER:
            if not _number(after) or not _number(before) or after < before:
                return True
        elif key in _LOWER:
            if not _number(after) or not _number(before) or after > before:
                return True
        elif key in ("properties", "required", "additionalProperties"):
            if input_changes(old, new):
                return True
        elif key == "items":
            if narrowed(before, after):
                return True
        else:
            return True
    return False


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def input_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """How an object input schema accepts less than before (empty: nothing it can see)."""
    if old == new:
        return []
    problems = []
    structural = {"properties", "required", "additionalProperties", *_ANNOTATIONS}
    for key in sorted((set(old) | set(new)) - structural):
        if old.get(key) != new.get(key) and (key in new and narrowed(old, {**old, key: new[key]})):
            problems.append(f"its input schema's {key} accepts less")
    old_props: Mapping[str, Any] = old.get("properties", {})
    new_props: Mapping[str, Any] = new.get("properties", {})
    for name, schema in old_props.items():
        if name not in new_props:
            problems.append(f"it removes input {name!r}")
        elif narrowed(schema, new_props[name]):
            problems.append(f"it narrows input {name!r}")
    for name in sorted(set(new.get("required", [])) - set(old.get("required", []))):
        problems.append(f"it adds required input {name!r}")
    old_extra = old.get("additionalProperties", True)
    new_extra = new.get("additionalProperties", True)
    if old_extra != new_extra and narrowed(old_extra, new_extra):
        problems.append("it accepts fewer extra input properties")
    if old_extra is not False:
        # A new property that restricts what the old schema let through as an extra.
        problems += [
            f"it restricts input {name!r}, which was accepted as an extra"
            for name, schema in new_props.items()
            if name not in old_props and narrowed(old_extra, schema)
        ]
    return problems


def output_changes(old: Mapping[str, Any] | None, new: Mapping[str, Any] | None) -> list[str]:
    """How a result schema promises less than before (callers rely on what it promised)."""
    if not old or old == new:
        return []
    if not new:
        return ["it no longer declares a structured result"]
    old_props: Mapping[str, Any] = old.get("properties", {})
    new_props: Mapping[str, Any] = new.get("properties", {})
    problems = []
    for name, schema in old_props.items():
        if name not in new_props:
            problems.append(f"it removes result property {name!r}")
        elif narrowed(new_props[name], schema):
            problems.append(f"it changes what result property {name!r} may hold")
    for name in sorted(set(old.get("required", [])) - set(new.get("required", []))):
        if name in new_props:
            problems.append(f"it no longer always returns {name!r}")
    return problems


def breaking_changes(
    *,
    old_input: Mapping[str, Any],
    new_input: Mapping[str, Any],
    old_output: Mapping[str, Any] | None,
    new_output: Mapping[str, Any] | None,
    old_side_effect: str,
    new_side_effect: str,
) -> list[str]:
    """Every way the new contract breaks callers of the old one (empty: compatible)."""
    problems = []
    if old_side_effect != new_side_effect:
        problems.append(f"its side effect changed ({old_side_effect} -> {new_side_effect})")
    problems += input_changes(old_input, new_input)
    problems += output_changes(old_output, new_output)
    return problems


def major_of(version: str) -> int:
    """The major number of a MAJOR.MINOR.PATCH version (ValueError otherwise)."""
    head = version.split(".", 1)[0]
    if not head.isdigit():
        raise ValueError(f"{version!r} is not a semantic version")
    return int(head)
