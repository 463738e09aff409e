"""docs/security.md's table of who may call which inner RPC, generated from the rules the
services enforce (their PEER_RULES, services.kit.peers).

`make docs` rewrites the table; tests/docs/test_security_doc.py fails when it is out of date,
so the threat model can never promise a rule the code does not enforce.
"""

from __future__ import annotations

import sys
from pathlib import Path

from services.auth.app import PEER_RULES as AUTH
from services.kit.peers import ANY_PEER, PeerRules
from services.memory.app import PEER_RULES as MEMORY
from services.router.app import PEER_RULES as ROUTER
from services.telemetry.app import PEER_RULES as TELEMETRY

SECURITY = Path(__file__).resolve().parents[2] / "docs" / "security.md"
BEGIN = "<!-- peers:begin -->"
END = "<!-- peers:end -->"
SERVICES: dict[str, PeerRules] = {
    "auth": AUTH,
    "router": ROUTER,
    "memory": MEMORY,
    "telemetry": TELEMETRY,
}


def _roles(roles: frozenset[str]) -> str:
    return "any mesh peer" if ANY_PEER in roles else ", ".join(sorted(roles))


def table() -> str:
    lines = [BEGIN, "", "| service | RPC | may call |", "|---|---|---|"]
    for service, rules in SERVICES.items():
        for method, roles in sorted(rules.by_method.items()):
            lines.append(f"| {service} | `{method}` | {_roles(roles)} |")
    return "\n".join([*lines, "", END])


def main() -> None:
    text = SECURITY.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    SECURITY.write_text(text[:start] + table() + text[end:])
    print(f"wrote the peer table of {SECURITY}", file=sys.stderr)


if __name__ == "__main__":
    main()
