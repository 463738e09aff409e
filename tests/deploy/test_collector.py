"""The OpenTelemetry Collector's configuration is wired end to end (no collector binary here)."""

from __future__ import annotations

import pytest

from tests.deploy import kube


def config(docs: list[kube.Doc]) -> kube.Doc:
    maps = [
        m
        for m in kube.of_kind(docs, "ConfigMap")
        if m["metadata"]["name"].startswith("otel-collector-config")
    ]
    assert len(maps) == 1
    (doc,) = kube.load_all(maps[0]["data"]["config.yaml"])
    return doc  # type: ignore[no-any-return]


@pytest.mark.parametrize("overlay", kube.SERVICE_OVERLAYS)
def test_every_pipeline_component_is_defined(
    rendered: dict[str, list[kube.Doc]], overlay: str
) -> None:
    cfg = config(rendered[overlay])
    service = cfg["service"]
    for extension in service.get("extensions", []):
        assert extension in cfg["extensions"]
    connectors = set(cfg.get("connectors", {}))
    for name, pipeline in service["pipelines"].items():
        for receiver in pipeline["receivers"]:
            assert receiver in cfg["receivers"] or receiver in connectors, (name, receiver)
        for processor in pipeline.get("processors", []):
            assert processor in cfg["processors"], (name, processor)
        for exporter in pipeline["exporters"]:
            assert exporter in cfg["exporters"] or exporter in connectors, (name, exporter)
    # memory_limiter must come first in every pipeline.
    for pipeline in service["pipelines"].values():
        assert pipeline["processors"][0] == "memory_limiter"


@pytest.mark.parametrize("overlay", kube.SERVICE_OVERLAYS)
def test_spans_go_to_telemetry_and_metrics_to_prometheus(
    rendered: dict[str, list[kube.Doc]], overlay: str
) -> None:
    docs = rendered[overlay]
    cfg = config(docs)
    exporter = cfg["exporters"]["otlp/telemetry"]
    assert exporter["endpoint"] == "dns:///telemetry-headless.toolmesh.svc.cluster.local:50055"
    assert "otlp/telemetry" in cfg["service"]["pipelines"]["traces"]["exporters"]
    assert cfg["exporters"]["prometheus"]["endpoint"].endswith(":8889")
    assert "prometheus" in cfg["service"]["pipelines"]["metrics"]["exporters"]
    assert cfg["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].endswith(":4317")
    (container,) = kube.pod_spec(kube.by_name(docs, "Deployment", "otel-collector"))["containers"]
    ports = {p["containerPort"] for p in container["ports"]}
    assert {4317, 8889, 13133} <= ports
    tls = exporter["tls"]
    if overlay == "overlays/prod":
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert tls["insecure"] is False and "/etc/toolmesh/tls" in mounts
        for key in ("ca_file", "cert_file", "key_file"):
            assert tls[key].startswith("/etc/toolmesh/tls/")
    else:
        assert tls["insecure"] is True
