"""Tenant tool allowlists: one matcher for the gateway and the router.

An entry is a tool name ("calculator", "time.get_current_time"), "*" for every tool, or a
backend pattern "<backend>.*" for every tool of that backend. Deny by default: a name no entry
matches is not allowed, and an empty list allows nothing. Patterns are deliberately this simple
(no globbing inside names): an allowlist is a security control and must read unambiguously.
"""

from __future__ import annotations

from collections.abc import Iterable

ALL_TOOLS = "*"


def entry_problem(entry: str) -> str | None:
    """Why ``entry`` is not a valid allowlist entry, or None when it is."""
    if entry == ALL_TOOLS:
        return None
    name = entry.removesuffix(".*")
    if not name or "*" in name or any(c.isspace() for c in name) or len(entry) > 200:
        return "a tool name, <backend>.* or *"
    return None


def tool_allowed(name: str, allowed: Iterable[str]) -> bool:
    for entry in allowed:
        if entry in (ALL_TOOLS, name):
            return True
        # "time.*" allows "time.now" but not "time." nor "timer.now".
        if entry.endswith(".*") and name.startswith(entry[:-1]) and len(name) >= len(entry):
            return True
    return False
