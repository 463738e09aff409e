"""The README's promises checked against the code."""

from __future__ import annotations

from tests.docs.configtable import BEGIN, END, README, table


def test_configuration_table_is_current() -> None:
    text = README.read_text()
    current = text[text.index(BEGIN) : text.index(END) + len(END)]
    assert current == table(), "README configuration table is stale: run `make docs`"


def test_readme_starts_with_the_two_commands() -> None:
    head = README.read_text().split("\n## ", 1)[0]
    assert "make run" in head and "make test" in head
