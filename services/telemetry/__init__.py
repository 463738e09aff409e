"""Telemetry: OTLP span ingest, latency and error statistics, traces (toolmesh.telemetry.v1)."""
