"""The MCP face's manifests: an HTTP process beside the gateway, probed over HTTP(S), reached by
any client on its one port, reaching nothing but the gateway, TLS in production."""

from __future__ import annotations

import pytest

from services.kit.settings import DEFAULT_PORTS
from tests.deploy import kube


def _face(docs: list[kube.Doc]) -> tuple[kube.Doc, kube.Doc, dict[str, str]]:
    deployment = kube.by_name(docs, "Deployment", kube.FACE)
    (container,) = kube.pod_spec(deployment)["containers"]
    return deployment, container, kube.config_env(docs, container)


@pytest.mark.parametrize(
    ("overlay", "scheme"), [("overlays/dev", None), ("overlays/prod", "HTTPS")]
)
def test_runs_mcpface_with_http_probes_on_its_own_port(
    rendered: dict[str, list[kube.Doc]], overlay: str, scheme: str | None
) -> None:
    deployment, container, env = _face(rendered[overlay])
    assert container["args"] == ["mcpface"]
    assert container["image"].startswith(kube.TOOLMESH_IMAGE + ":")
    assert (
        kube.port_number(container, "http") == kube.FACE_PORT == int(env["TOOLMESH_MCPFACE_PORT"])
    )
    assert kube.port_number(container, "metrics") == int(env["TOOLMESH_MCPFACE_METRICS_PORT"])
    assert env["TOOLMESH_HOST"] == "0.0.0.0" and env["TOOLMESH_MCPFACE_PATH"] == "/mcp"
    paths = {"startupProbe": "/healthz", "readinessProbe": "/readyz", "livenessProbe": "/healthz"}
    for probe, path in paths.items():
        get = container[probe]["httpGet"]
        assert (get["path"], get["port"], get.get("scheme")) == (path, "http", scheme), probe
    assert env["TOOLMESH_MCPFACE_GATEWAY_TARGET"] == (
        f"dns:///gateway-headless.toolmesh.svc.cluster.local:{DEFAULT_PORTS['gateway']}"
    )
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(kube.FACE_METRICS_PORT)
    pod = kube.pod_spec(deployment)
    grace = float(env["TOOLMESH_GRACE_PERIOD_S"])
    assert (
        pod["terminationGracePeriodSeconds"]
        > container["lifecycle"]["preStop"]["sleep"]["seconds"] + grace
    )


def test_production_serves_https_and_calls_the_gateway_with_its_certificate(
    rendered: dict[str, list[kube.Doc]],
) -> None:
    docs = rendered["overlays/prod"]
    deployment, container, env = _face(docs)
    assert env["TOOLMESH_ENV"] == "production"
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    for kind in ("CERT", "KEY", "CA"):
        assert env[f"TOOLMESH_TLS_{kind}_FILE"].startswith("/etc/toolmesh/tls/")
    assert mounts["/etc/toolmesh/tls"]["readOnly"] is True
    volumes = {v["name"]: v for v in kube.pod_spec(deployment)["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "mcpface-tls"
    assert env["TOOLMESH_MCPFACE_ALLOWED_HOSTS"]
    # The same Deployment whether shipped alone or with the whole mesh.
    alone = kube.by_name(rendered["overlays/prod/mcpface"], "Deployment", kube.FACE)
    assert alone == deployment


@pytest.mark.parametrize("overlay", kube.SERVICE_OVERLAYS)
def test_clients_reach_its_port_and_it_reaches_only_the_gateway(
    rendered: dict[str, list[kube.Doc]], overlay: str
) -> None:
    docs = rendered[overlay]
    policies = kube.of_kind(docs, "NetworkPolicy")
    pods = {d["metadata"]["name"]: kube.pod_labels(d) for d in kube.of_kind(docs, "Deployment")}
    face = pods[kube.FACE]
    assert kube.connection_allowed(policies, None, face, kube.FACE_PORT)
    assert not kube.connection_allowed(policies, None, face, kube.FACE_METRICS_PORT)
    assert kube.connection_allowed(policies, face, pods["gateway"], DEFAULT_PORTS["gateway"])
    for inner in ("auth", "router", "memory"):
        assert not kube.connection_allowed(policies, face, pods[inner], DEFAULT_PORTS[inner])
    assert not kube.connection_allowed(policies, face, None, 443)
