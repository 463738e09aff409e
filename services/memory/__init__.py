"""Memory: persistent conversation turns per tenant and session (toolmesh.memory.v1)."""
