"""toolmesh's MCP face: MCP over streamable HTTP in front of the gateway.

A thin adapter process: ``tools/list`` is Gateway.ListTools and ``tools/call`` is
Gateway.CallTool, with the caller's own bearer token, so an MCP client gets the same
allowlists, scopes, budgets, idempotency and audit as a gRPC caller. It imports only the
generated contracts and services.kit (never gateway/ code); see docs/design.md for why it is a
process of its own and docs/mcp.md for how it maps MCP onto the gateway.
"""
