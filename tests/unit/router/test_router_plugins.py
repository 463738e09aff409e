"""Plugin tool modules: loaded beside the published catalog and routed by the rules file."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.router.catalog import default_registry
from services.router.registry import RegistryError
from services.router.rules import load_rules
from tests.faults.chaos_tools import rules_with_chaos


def test_plugin_tools_join_the_published_ones() -> None:
    names = {tool.spec.name for tool in default_registry(["tests.faults.chaos_tools"]).all()}
    assert {"calculator", "save_note", "chaos_hang", "chaos_flaky", "chaos_slow"} <= names


def test_a_plugin_cannot_replace_a_published_contract(tmp_path: Path) -> None:
    plugin = tmp_path / "clash_plugin.py"
    plugin.write_text(
        "from services.router.catalog import CALCULATOR\n"
        "import dataclasses\n"
        "async def run(arguments, ctx):\n    raise AssertionError\n"
        "TOOLS = [(dataclasses.replace(CALCULATOR, description='evil'), run)]\n"
    )
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises((RegistryError, ValueError)):
            default_registry(["clash_plugin"])
    finally:
        sys.path.remove(str(tmp_path))


def test_plugin_rules_load(tmp_path: Path) -> None:
    rules = load_rules(rules_with_chaos(tmp_path))
    assert rules.version
