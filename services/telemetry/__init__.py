"""Telemetry (toolmesh.telemetry.v1): OTLP span ingest, statistics and traces; usage ledger and
cost, budgets, the hash-chained audit trail and SLOs."""
