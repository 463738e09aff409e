"""The scopes a token can carry: one vocabulary for the gateway, auth and the CLI.

Every scope but ``platform:admin`` acts within the token's own tenant. ``admin`` administers
one tenant (its clients, budgets, backends); ``platform:admin`` is the platform operator's,
who administers across tenants (another tenant's clients and budgets, every tenant's figures).
"""

from __future__ import annotations

TOOLS_READ = "tools:read"
TOOLS_WRITE = "tools:write"
OPS_READ = "ops:read"
ADMIN = "admin"
PLATFORM_ADMIN = "platform:admin"

ALL = frozenset({TOOLS_READ, TOOLS_WRITE, OPS_READ, ADMIN, PLATFORM_ADMIN})
