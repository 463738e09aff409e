"""Prometheus metrics over HTTP, produced through the OpenTelemetry metrics SDK."""

from __future__ import annotations

import logging

from opentelemetry import metrics
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from prometheus_client import start_http_server

log = logging.getLogger(__name__)

METER_NAME = "toolmesh"


def configure_metrics(service: str, host: str, port: int) -> MeterProvider:
    """Install a global meter provider; serve /metrics on ``port`` (0: no HTTP endpoint)."""
    readers = []
    if port:
        readers.append(PrometheusMetricReader())
        start_http_server(port, addr=host)
        log.info("metrics", extra={"address": f"{host}:{port}", "path": "/metrics"})
    provider = MeterProvider(
        resource=Resource.create({SERVICE_NAME: f"toolmesh-{service}"}), metric_readers=readers
    )
    metrics.set_meter_provider(provider)
    return provider


def meter() -> metrics.Meter:
    return metrics.get_meter(METER_NAME)
