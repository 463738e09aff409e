"""The registry keeps published tool versions immutable."""

from __future__ import annotations

import dataclasses

import pytest

from services.router.catalog import CALCULATOR, TOOLS, default_registry, run_calculator
from services.router.registry import (
    Registry,
    RegistryError,
    is_allowed,
    load_lock,
    semver_key,
)


def test_the_same_version_with_a_different_contract_is_refused() -> None:
    registry = Registry()
    registry.register(CALCULATOR, run_calculator)
    changed = dataclasses.replace(CALCULATOR, timeout_ms=CALCULATOR.timeout_ms + 1)
    with pytest.raises(RegistryError, match=r"calculator@1\.0\.0 is already published"):
        registry.register(changed, run_calculator)


def test_registering_the_identical_contract_again_is_a_no_op() -> None:
    registry = Registry()
    first = registry.register(CALCULATOR, run_calculator)
    assert registry.register(dataclasses.replace(CALCULATOR), run_calculator) is first


def test_a_new_version_sits_beside_the_old_and_routing_offers_the_latest_release() -> None:
    registry = Registry()
    registry.register(CALCULATOR, run_calculator)
    registry.register(dataclasses.replace(CALCULATOR, version="1.10.0"), run_calculator)
    registry.register(dataclasses.replace(CALCULATOR, version="2.0.0-rc.1"), run_calculator)
    latest = registry.latest("calculator")
    assert latest is not None and latest.spec.version == "1.10.0"
    assert registry.get("calculator", "1.0.0") is not None
    assert registry.get("calculator", "2.0.0-rc.1") is not None


def test_every_published_version_is_pinned_in_the_lock_file() -> None:
    assert default_registry().fingerprints() == load_lock()
    assert len(load_lock()) == len(TOOLS)


def test_an_edited_published_contract_fails_the_lock_check() -> None:
    registry = Registry()
    registry.register(dataclasses.replace(CALCULATOR, cost_units=5), run_calculator)
    with pytest.raises(RegistryError, match=r"changed without a new version: calculator@1\.0\.0"):
        registry.check_published(load_lock())


@pytest.mark.parametrize(
    "change",
    [
        {"version": "1.0"},
        {"name": "Calculator"},
        {"timeout_ms": 0},
        {"input_schema": {"type": "nonsense"}},
    ],
)
def test_malformed_contracts_are_refused(change: dict[str, object]) -> None:
    with pytest.raises(RegistryError):
        Registry().register(dataclasses.replace(CALCULATOR, **change), run_calculator)  # type: ignore[arg-type]


def test_semver_ordering() -> None:
    versions = ["1.0.0", "1.0.0-alpha", "0.9.9", "1.10.0", "1.2.0"]
    assert sorted(versions, key=semver_key) == ["0.9.9", "1.0.0-alpha", "1.0.0", "1.2.0", "1.10.0"]


def test_allowlist_denies_by_default() -> None:
    assert is_allowed("calculator", ["*"])
    assert is_allowed("calculator", ["calculator", "save_note"])
    assert not is_allowed("calculator", ["save_note"])
    assert not is_allowed("calculator", [])
    assert not is_allowed("calculator", ["calc*"])
