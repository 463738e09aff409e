"""Harness shared by the tests and the benchmarks: the real services as real processes.

Neither product code (no service, gateway, MCP face or CLI imports it) nor test code: bench/
may import it but not tests/ (the import contracts in pyproject.toml)."""
