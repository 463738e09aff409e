"""Tool backends: MCP servers (stdio, streamable HTTP) and gRPC tool services, registered at run
time, stored in the router's database and served by every replica (docs/tools.md)."""
