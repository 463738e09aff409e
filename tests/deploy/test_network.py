"""NetworkPolicies, evaluated: who can open a connection to whom in each overlay."""

from __future__ import annotations

import pytest

from services.kit.settings import DEFAULT_PORTS
from tests.deploy import kube

INNER = ["auth", "router", "memory"]
MONITORING = {"kubernetes.io/metadata.name": "monitoring"}
PROMETHEUS = {"app.kubernetes.io/name": "prometheus"}
KUBE_SYSTEM = {"kubernetes.io/metadata.name": "kube-system"}
KUBE_DNS = {"k8s-app": "kube-dns"}


def pods(docs: list[kube.Doc]) -> dict[str, dict[str, str]]:
    """Pod labels of every workload (Deployments and migration Jobs), by workload name."""
    return {
        w["metadata"]["name"]: kube.pod_labels(w)
        for w in docs
        if w["kind"] in ("Deployment", "Job")
    }


@pytest.fixture(params=kube.SERVICE_OVERLAYS)
def mesh(request: pytest.FixtureRequest, rendered: dict[str, list[kube.Doc]]):  # type: ignore[no-untyped-def]
    docs = rendered[request.param]
    migrations = rendered[f"{request.param}/migrations"]
    return kube.of_kind(docs, "NetworkPolicy"), pods(docs) | pods(migrations)


def test_default_deny_in_both_directions(rendered: dict[str, list[kube.Doc]]) -> None:
    for overlay in kube.SERVICE_OVERLAYS:
        deny = [
            p
            for p in kube.of_kind(rendered[overlay], "NetworkPolicy")
            if p["spec"]["podSelector"] == {}
            and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
            and not p["spec"].get("ingress")
            and not p["spec"].get("egress")
        ]
        assert len(deny) == 1, overlay


def test_only_the_gateway_reaches_auth_router_and_memory(mesh) -> None:  # type: ignore[no-untyped-def]
    policies, workloads = mesh
    for target in INNER:
        port = DEFAULT_PORTS[target]
        callers = {
            name
            for name, labels in workloads.items()
            if kube.connection_allowed(policies, labels, workloads[target], port)
        }
        assert callers == {"gateway"}, target
        # Nor from outside the namespace or the cluster, nor from Prometheus on the gRPC port.
        assert not kube.connection_allowed(policies, None, workloads[target], port)
        assert not kube.connection_allowed(policies, PROMETHEUS, workloads[target], port)


def test_every_policy_rule_into_the_inner_services_names_the_gateway(mesh) -> None:  # type: ignore[no-untyped-def]
    """The same rule read statically: no ingress rule opens the inner gRPC ports wider."""
    policies, workloads = mesh
    for policy in policies:
        for target in INNER:
            if not kube.selects(policy["spec"]["podSelector"], workloads[target]):
                continue
            for rule in policy["spec"].get("ingress") or []:
                ports = {p["port"] for p in rule.get("ports", [])}
                assert ports, f"{policy['metadata']['name']} opens every port"
                if ports == {kube.METRICS_PORTS[target]}:
                    continue
                assert ports == {DEFAULT_PORTS[target]}
                assert rule["from"] == [
                    {
                        "podSelector": {
                            "matchLabels": {
                                "app.kubernetes.io/name": "gateway",
                                "app.kubernetes.io/part-of": "toolmesh",
                            }
                        }
                    }
                ]


def test_anyone_reaches_the_gateway_on_its_grpc_port_only(mesh) -> None:  # type: ignore[no-untyped-def]
    policies, workloads = mesh
    gateway = workloads["gateway"]
    assert kube.connection_allowed(policies, None, gateway, DEFAULT_PORTS["gateway"])
    # Inner pods have no egress to it: they never call back into the gateway.
    assert not kube.connection_allowed(policies, workloads["memory"], gateway, 50051)
    assert not kube.connection_allowed(policies, None, gateway, 22)
    assert not kube.connection_allowed(policies, None, gateway, kube.METRICS_PORTS["gateway"])


def test_telemetry_takes_otlp_from_every_toolmesh_pod_and_the_collector(mesh) -> None:  # type: ignore[no-untyped-def]
    policies, workloads = mesh
    for name, labels in workloads.items():
        if name.endswith("-migrate"):
            continue
        assert kube.connection_allowed(policies, labels, workloads["telemetry"], 50055), name
        assert kube.connection_allowed(policies, labels, workloads["otel-collector"], 4317), name
    assert not kube.connection_allowed(policies, None, workloads["telemetry"], 50055)


def test_collector_forwards_to_telemetry(mesh) -> None:  # type: ignore[no-untyped-def]
    policies, workloads = mesh
    assert kube.connection_allowed(
        policies, workloads["otel-collector"], workloads["telemetry"], 50055
    )


def test_inner_services_cannot_call_each_other(mesh) -> None:  # type: ignore[no-untyped-def]
    policies, workloads = mesh
    for src in ("auth", "router", "memory", "telemetry", "otel-collector"):
        for dst in INNER:
            if src != dst:
                assert not kube.connection_allowed(
                    policies, workloads[src], workloads[dst], DEFAULT_PORTS[dst]
                ), (src, dst)
    # The router's one outbound call: tool health statistics from telemetry.
    assert kube.connection_allowed(policies, workloads["router"], workloads["telemetry"], 50055)


def test_every_pod_resolves_names_and_reaches_postgres_but_nothing_else_outside(mesh) -> None:  # type: ignore[no-untyped-def]
    policies, workloads = mesh
    for name, labels in workloads.items():
        for protocol in ("UDP", "TCP"):
            assert kube.connection_allowed(
                policies, labels, KUBE_DNS, 53, protocol, dst_ns=KUBE_SYSTEM
            ), name
        assert kube.connection_allowed(policies, labels, None, 5432), name
        assert not kube.connection_allowed(policies, labels, None, 443), name
        assert not kube.connection_allowed(policies, labels, None, 80), name


def test_prometheus_scrapes_every_metrics_port(mesh) -> None:  # type: ignore[no-untyped-def]
    policies, workloads = mesh
    for app, port in kube.METRICS_PORTS.items():
        assert kube.connection_allowed(policies, None, workloads[app], port) is False
        assert _from_monitoring(policies, workloads[app], port), app
    assert _from_monitoring(policies, workloads["otel-collector"], 8889)


def _from_monitoring(policies: list[kube.Doc], dst: dict[str, str], port: int) -> bool:
    applying = [
        p
        for p in policies
        if "Ingress" in p["spec"]["policyTypes"] and kube.selects(p["spec"]["podSelector"], dst)
    ]
    for policy in applying:
        for rule in policy["spec"].get("ingress") or []:
            for peer in rule.get("from", []):
                if (
                    kube.selects(peer.get("namespaceSelector"), MONITORING)
                    and kube.selects(peer.get("podSelector"), PROMETHEUS)
                    and any(p["port"] == port for p in rule.get("ports", []))
                ):
                    return True
    return False


def test_the_evaluator_sees_a_hole(rendered: dict[str, list[kube.Doc]]) -> None:
    """Proof the evaluator can fail: an allow-all ingress policy lets memory reach auth."""
    docs = rendered["overlays/prod"]
    policies = kube.of_kind(docs, "NetworkPolicy")
    workloads = pods(docs)
    assert not kube.connection_allowed(policies, workloads["memory"], workloads["auth"], 50052)
    hole = {
        "kind": "NetworkPolicy",
        "metadata": {"name": "hole"},
        "spec": {
            "podSelector": {},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{}],
            "egress": [{}],
        },
    }
    assert kube.connection_allowed([*policies, hole], workloads["memory"], workloads["auth"], 50052)
