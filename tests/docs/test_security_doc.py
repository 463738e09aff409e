"""docs/security.md's promises checked against the code."""

from __future__ import annotations

from tests.docs.peertable import BEGIN, END, SECURITY, table


def test_the_per_rpc_peer_table_is_what_the_services_enforce() -> None:
    text = SECURITY.read_text()
    current = text[text.index(BEGIN) : text.index(END) + len(END)]
    assert current == table(), "docs/security.md's peer table is stale: run `make docs`"
