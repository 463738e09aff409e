"""What a reviewer checks in the rendered manifests of every overlay."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from services.kit.settings import DEFAULT_PORTS
from tests.deploy import kube

OVERLAY_PATHS = kube.OVERLAYS
REPO_FILES = kube.REPO


def service_of(workload: kube.Doc) -> str:
    return str(kube.pod_labels(workload)["app.kubernetes.io/name"])


def toolmesh_deployments(docs: list[kube.Doc]) -> list[kube.Doc]:
    return [d for d in kube.of_kind(docs, "Deployment") if service_of(d) in kube.SERVICES]


def grpc_port(container: kube.Doc) -> int:
    return kube.port_number(container, "grpc")


# ---------------------------------------------------------------- containers


@pytest.mark.parametrize("overlay", kube.SERVICE_OVERLAYS)
def test_every_container_has_readiness_liveness_and_startup_probes(
    rendered: dict[str, list[kube.Doc]], overlay: str
) -> None:
    for workload, container in kube.containers(rendered[overlay]):
        if workload["kind"] != "Deployment":
            continue
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            assert probe in container, f"{container['name']} has no {probe}"


@pytest.mark.parametrize("overlay", ["overlays/dev", "base"])
def test_plaintext_services_use_native_grpc_probes_on_their_own_port(
    rendered: dict[str, list[kube.Doc]], overlay: str
) -> None:
    for deployment in toolmesh_deployments(rendered[overlay]):
        service = service_of(deployment)
        (container,) = kube.pod_spec(deployment)["containers"]
        assert grpc_port(container) == DEFAULT_PORTS[service]
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            assert container[probe]["grpc"]["port"] == DEFAULT_PORTS[service], (service, probe)


def test_mtls_services_probe_grpc_health_over_tls_on_their_own_port(
    rendered: dict[str, list[kube.Doc]],
) -> None:
    """Kubelet's gRPC probe has no TLS; with mTLS on, the exec probe checks the same port."""
    docs = rendered["overlays/prod"]
    for deployment in toolmesh_deployments(docs):
        service = service_of(deployment)
        (container,) = kube.pod_spec(deployment)["containers"]
        env = kube.config_env(docs, container)
        assert env["TOOLMESH_TLS_CERT_FILE"].startswith("/etc/toolmesh/tls/")
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert mounts["/etc/toolmesh/tls"]["readOnly"] is True
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            command = container[probe]["exec"]["command"]
            assert command[:2] == ["python", "/app/grpc_health_tls.py"]
            assert int(command[2]) == grpc_port(container) == DEFAULT_PORTS[service]
            assert command[3] == f"{service}-headless.toolmesh.svc.cluster.local"


@pytest.mark.parametrize("overlay", OVERLAY_PATHS)
def test_every_container_has_requests_and_limits(
    rendered: dict[str, list[kube.Doc]], overlay: str
) -> None:
    for workload, container in kube.containers(rendered[overlay]):
        resources = container.get("resources", {})
        for kind in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                assert resource in resources.get(kind, {}), (
                    f"{workload['metadata']['name']}/{container['name']} lacks {kind}.{resource}"
                )


@pytest.mark.parametrize("overlay", OVERLAY_PATHS)
def test_every_container_is_locked_down(rendered: dict[str, list[kube.Doc]], overlay: str) -> None:
    for workload, container in kube.containers(rendered[overlay]):
        pod = kube.pod_spec(workload)
        pod_ctx = pod.get("securityContext", {})
        ctx = container.get("securityContext", {})
        where = f"{workload['metadata']['name']}/{container['name']}"
        assert ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")) is True, where
        assert ctx.get("runAsUser", pod_ctx.get("runAsUser")) == kube.APP_UID, where
        assert ctx.get("readOnlyRootFilesystem") is True, where
        assert ctx.get("allowPrivilegeEscalation") is False, where
        assert ctx.get("privileged", False) is False, where
        assert ctx.get("capabilities", {}).get("drop") == ["ALL"], where
        assert ctx.get("capabilities", {}).get("add") in (None, []), where
        seccomp = ctx.get("seccompProfile", pod_ctx.get("seccompProfile", {}))
        assert seccomp.get("type") == "RuntimeDefault", where
        assert pod.get("automountServiceAccountToken") is False, where
        assert not pod.get("hostNetwork") and not pod.get("hostPID"), where


@pytest.mark.parametrize("overlay", OVERLAY_PATHS)
def test_images_are_pinned_by_a_version_tag(
    rendered: dict[str, list[kube.Doc]], overlay: str
) -> None:
    for workload, container in kube.containers(rendered[overlay]):
        image = container["image"]
        name, _, tag = image.rpartition(":")
        assert "@sha256:" in image or (name and "/" not in tag), f"untagged image {image}"
        assert tag != "latest", f"{workload['metadata']['name']} runs :latest"
        assert re.fullmatch(r"v?\d+\.\d+\.\d+([-.+][\w.]+)?", tag.split("@")[0]), image


@pytest.mark.parametrize("overlay", kube.SERVICE_OVERLAYS)
def test_the_service_runs_its_own_module_on_its_own_ports(
    rendered: dict[str, list[kube.Doc]], overlay: str
) -> None:
    docs = rendered[overlay]
    for deployment in toolmesh_deployments(docs):
        service = service_of(deployment)
        (container,) = kube.pod_spec(deployment)["containers"]
        assert container["args"] == [kube.MODULES[service]]
        assert container["image"].startswith(kube.TOOLMESH_IMAGE + ":")
        env = kube.config_env(docs, container)
        up = service.upper()
        assert env["TOOLMESH_HOST"] == "0.0.0.0"
        assert int(env[f"TOOLMESH_{up}_PORT"]) == DEFAULT_PORTS[service] == grpc_port(container)
        metrics = kube.METRICS_PORTS[service]
        assert int(env[f"TOOLMESH_{up}_METRICS_PORT"]) == metrics
        assert kube.port_number(container, "metrics") == metrics
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == str(metrics)


@pytest.mark.parametrize(
    ("overlay", "env_name"), [("overlays/dev", "dev"), ("overlays/prod", "production")]
)
def test_environment_and_writable_paths(
    rendered: dict[str, list[kube.Doc]], overlay: str, env_name: str
) -> None:
    docs = rendered[overlay]
    for deployment in toolmesh_deployments(docs):
        (container,) = kube.pod_spec(deployment)["containers"]
        env = kube.config_env(docs, container)
        assert env["TOOLMESH_ENV"] == env_name
        # The root filesystem is read-only: the data dir must be inside a mounted volume, in a
        # directory of its own that the service creates 0700 (a volume's root is open to others).
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        data_dir = Path(env["TOOLMESH_DATA_DIR"])
        assert str(data_dir) not in mounts and str(data_dir.parent) in mounts
        assert "/tmp" in mounts


@pytest.mark.parametrize("overlay", kube.SERVICE_OVERLAYS)
def test_spans_never_loop_back_into_telemetry(
    rendered: dict[str, list[kube.Doc]], overlay: str
) -> None:
    docs = rendered[overlay]
    for deployment in toolmesh_deployments(docs):
        service = service_of(deployment)
        (container,) = kube.pod_spec(deployment)["containers"]
        env = kube.config_env(docs, container)
        if service == "telemetry":
            assert env["TOOLMESH_TELEMETRY_OTLP_ENDPOINT"] == ""
            assert env["TOOLMESH_TELEMETRY_FORWARD_OTLP_ENDPOINT"] == ""
        else:
            assert env["TOOLMESH_OTLP_ENDPOINT"] == "otel-collector.toolmesh.svc.cluster.local:4317"


def test_gateway_balances_over_headless_services(rendered: dict[str, list[kube.Doc]]) -> None:
    docs = rendered["overlays/prod"]
    (container,) = kube.pod_spec(kube.by_name(docs, "Deployment", "gateway"))["containers"]
    env = kube.config_env(docs, container)
    headless = {
        s["metadata"]["name"]
        for s in kube.of_kind(docs, "Service")
        if s["spec"].get("clusterIP") == "None"
    }
    for target in ("auth", "router", "memory", "telemetry"):
        value = env[f"TOOLMESH_GATEWAY_{target.upper()}_TARGET"]
        assert value == (
            f"dns:///{target}-headless.toolmesh.svc.cluster.local:{DEFAULT_PORTS[target]}"
        )
        assert f"{target}-headless" in headless


@pytest.mark.parametrize("service", ["auth", "router"])
def test_services_that_call_telemetry_balance_over_its_replicas(
    rendered: dict[str, list[kube.Doc]], service: str
) -> None:
    """Router reads tool health and auth sends its audit trail to telemetry."""
    docs = rendered["overlays/prod"]
    (container,) = kube.pod_spec(kube.by_name(docs, "Deployment", service))["containers"]
    env = kube.config_env(docs, container)
    assert env[f"TOOLMESH_{service.upper()}_TELEMETRY_TARGET"] == (
        f"dns:///telemetry-headless.toolmesh.svc.cluster.local:{DEFAULT_PORTS['telemetry']}"
    )


# ---------------------------------------------------------------- secrets


@pytest.mark.parametrize(("overlay", "optional"), [("overlays/dev", True), ("overlays/prod", None)])
def test_database_url_comes_from_a_secret(
    rendered: dict[str, list[kube.Doc]], overlay: str, optional: bool | None
) -> None:
    docs = rendered[overlay]
    for deployment in toolmesh_deployments(docs):
        service = service_of(deployment)
        (container,) = kube.pod_spec(deployment)["containers"]
        env = {e["name"]: e for e in container.get("env", [])}
        name = f"TOOLMESH_{service.upper()}_DATABASE_URL"
        if service == "gateway" and overlay == "overlays/prod":
            # Its only database is its outbox's.
            name = "TOOLMESH_GATEWAY_OUTBOX_URL"
        elif service not in kube.DB_SERVICES:
            assert name not in env
            continue
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == f"{service}-database"
        # Production must not silently fall back to a per-pod SQLite file.
        assert ref.get("optional") is optional
        assert "DATABASE_URL" not in " ".join(kube.config_env(docs, container))


def test_prod_outboxes_live_in_postgresql_not_in_the_pod(
    rendered: dict[str, list[kube.Doc]],
) -> None:
    """Issue 15: an outbox on an emptyDir dies with its pod. In production the gateway's is a
    table of its own database and auth's a table of auth's (no outbox file setting at all)."""
    docs = rendered["overlays/prod"]
    for name in ("gateway", "auth"):
        (container,) = kube.pod_spec(kube.by_name(docs, "Deployment", name))["containers"]
        env = {e["name"]: e for e in container.get("env", [])}
        settings = {**kube.config_env(docs, container), **env}
        assert "TOOLMESH_AUTH_AUDIT_OUTBOX_FILE" not in settings
        url = "TOOLMESH_GATEWAY_OUTBOX_URL" if name == "gateway" else "TOOLMESH_AUTH_DATABASE_URL"
        assert env[url]["valueFrom"]["secretKeyRef"] == {"name": f"{name}-database", "key": "url"}
    dev = kube.by_name(rendered["overlays/dev"], "Deployment", "gateway")
    (container,) = kube.pod_spec(dev)["containers"]
    assert "TOOLMESH_GATEWAY_OUTBOX_URL" not in {e["name"] for e in container.get("env", [])}


def test_prod_auth_mounts_its_signing_keys_from_a_secret(
    rendered: dict[str, list[kube.Doc]],
) -> None:
    deployment = kube.by_name(rendered["overlays/prod"], "Deployment", "auth")
    volumes = {v["name"]: v for v in kube.pod_spec(deployment)["volumes"]}
    assert volumes["signing-keys"]["secret"]["secretName"] == "auth-signing-keys"
    (container,) = kube.pod_spec(deployment)["containers"]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["signing-keys"]["mountPath"] == "/var/lib/toolmesh/auth/keys"
    assert mounts["signing-keys"]["readOnly"] is True


def test_no_secret_value_is_in_the_tree(rendered: dict[str, list[kube.Doc]]) -> None:
    for path, docs in rendered.items():
        assert not kube.of_kind(docs, "Secret"), f"{path} renders a Secret"
    for file in kube.DEPLOY.rglob("*"):
        if file.suffix not in (".yaml", ".yml", ".env", ".json") or not file.is_file():
            continue
        text = file.read_text()
        for doc in kube.load_all(text) if file.suffix != ".env" else []:
            if isinstance(doc, dict):
                assert doc.get("kind") != "Secret", f"{file} defines a Secret"
                assert "secretGenerator" not in doc, f"{file} generates a Secret"
        assert not re.search(r"postgres(ql)?://[^:\s/]+:[^@\s]+@", text), f"{file}: inline password"
        assert "BEGIN PRIVATE KEY" not in text and "BEGIN EC PRIVATE KEY" not in text, file


# ---------------------------------------------------------------- services, HPA, PDB


@pytest.mark.parametrize("overlay", kube.SERVICE_OVERLAYS)
def test_service_selectors_and_ports_match_the_pods(
    rendered: dict[str, list[kube.Doc]], overlay: str
) -> None:
    docs = rendered[overlay]
    deployments = kube.of_kind(docs, "Deployment")
    for service in kube.of_kind(docs, "Service"):
        name = service["metadata"]["name"]
        selector = {"matchLabels": service["spec"]["selector"]}
        matched = [d for d in deployments if kube.selects(selector, kube.pod_labels(d))]
        assert len(matched) == 1, f"Service {name} selects {len(matched)} Deployments"
        (container,) = kube.pod_spec(matched[0])["containers"]
        for port in service["spec"]["ports"]:
            assert kube.port_number(container, port["targetPort"]) == port["port"], name
        app = service_of(matched[0])
        if app in kube.SERVICES:
            assert [p["port"] for p in service["spec"]["ports"]] == [DEFAULT_PORTS[app]]


@pytest.mark.parametrize("overlay", kube.SERVICE_OVERLAYS)
def test_each_service_has_a_headless_service_and_only_the_gateway_a_cluster_ip(
    rendered: dict[str, list[kube.Doc]], overlay: str
) -> None:
    services = {s["metadata"]["name"]: s for s in kube.of_kind(rendered[overlay], "Service")}
    for app in kube.SERVICES:
        assert services[f"{app}-headless"]["spec"]["clusterIP"] == "None"
    balanced = {name for name, s in services.items() if s["spec"].get("clusterIP") != "None"}
    # The MCP face speaks HTTP/1.1 behind an Ingress: a ClusterIP balances its connections.
    assert balanced == {"gateway", kube.FACE, "otel-collector"}


@pytest.mark.parametrize(("overlay", "floor"), [("overlays/dev", 1), ("overlays/prod", 3)])
def test_autoscalers_target_existing_deployments(
    rendered: dict[str, list[kube.Doc]], overlay: str, floor: int
) -> None:
    docs = rendered[overlay]
    hpas = kube.of_kind(docs, "HorizontalPodAutoscaler")
    assert {h["spec"]["scaleTargetRef"]["name"] for h in hpas} == {*kube.SERVICES, kube.FACE}
    for hpa in hpas:
        ref = hpa["spec"]["scaleTargetRef"]
        assert ref["kind"] == "Deployment" and ref["apiVersion"] == "apps/v1"
        deployment = kube.by_name(docs, "Deployment", ref["name"])
        assert hpa["spec"]["minReplicas"] >= floor >= 1
        assert hpa["spec"]["maxReplicas"] >= hpa["spec"]["minReplicas"]
        if overlay == "overlays/prod":
            # The HPA owns the count: an apply must not reset it.
            assert "replicas" not in deployment["spec"]


@pytest.mark.parametrize("overlay", kube.SERVICE_OVERLAYS)
def test_disruption_budgets_select_their_deployment_and_leave_room_to_drain(
    rendered: dict[str, list[kube.Doc]], overlay: str
) -> None:
    docs = rendered[overlay]
    hpas = {
        h["spec"]["scaleTargetRef"]["name"]: h
        for h in kube.of_kind(docs, "HorizontalPodAutoscaler")
    }
    pdbs = kube.of_kind(docs, "PodDisruptionBudget")
    assert {p["metadata"]["name"] for p in pdbs} == {*kube.SERVICES, kube.FACE, "otel-collector"}
    for pdb in pdbs:
        matched = [
            d
            for d in kube.of_kind(docs, "Deployment")
            if kube.selects(pdb["spec"]["selector"], kube.pod_labels(d))
        ]
        assert [d["metadata"]["name"] for d in matched] == [pdb["metadata"]["name"]]
        name = pdb["metadata"]["name"]
        if overlay == "overlays/prod":
            floor = (
                hpas[name]["spec"]["minReplicas"]
                if name in hpas
                else matched[0]["spec"]["replicas"]
            )
            # minAvailable, and below the smallest replica count so a node can still drain.
            assert 1 <= pdb["spec"]["minAvailable"] < floor, name
        else:
            assert pdb["spec"]["maxUnavailable"] == 1, name


@pytest.mark.parametrize("overlay", kube.SERVICE_OVERLAYS)
def test_termination_grace_outlasts_the_drain(
    rendered: dict[str, list[kube.Doc]], overlay: str
) -> None:
    docs = rendered[overlay]
    for deployment in toolmesh_deployments(docs):
        pod = kube.pod_spec(deployment)
        (container,) = pod["containers"]
        grace = float(kube.config_env(docs, container)["TOOLMESH_GRACE_PERIOD_S"])
        pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert pre_stop >= 3, "endpoints need a few seconds to drop the pod"
        assert pod["terminationGracePeriodSeconds"] > pre_stop + grace


@pytest.mark.parametrize("overlay", kube.SERVICE_OVERLAYS)
def test_pods_spread_over_nodes_and_zones(
    rendered: dict[str, list[kube.Doc]], overlay: str
) -> None:
    for deployment in kube.of_kind(rendered[overlay], "Deployment"):
        pod = kube.pod_spec(deployment)
        keys = {c["topologyKey"] for c in pod.get("topologySpreadConstraints", [])}
        assert "kubernetes.io/hostname" in keys, deployment["metadata"]["name"]
        for constraint in pod["topologySpreadConstraints"]:
            assert kube.selects(constraint["labelSelector"], kube.pod_labels(deployment))


def test_capacity_comments_state_the_formula() -> None:
    for app in [*kube.SERVICES, kube.FACE]:
        text = (kube.K8S / "base" / app / "hpa.yaml").read_text()
        assert "W = ceil(" in text, app
        minimum = int(re.search(r"minReplicas: (\d+)", text).group(1))  # type: ignore[union-attr]
        assert f"= {minimum}" in text or f"-> {minimum}" in text, app


def test_files_exist_for_every_service() -> None:
    for app in [*kube.SERVICES, kube.FACE]:
        folder = Path(kube.K8S / "base" / app)
        for name in (
            "deployment.yaml",
            "service.yaml",
            "hpa.yaml",
            "pdb.yaml",
            "serviceaccount.yaml",
            "networkpolicy.yaml",
            "config.env",
        ):
            assert (folder / name).is_file(), folder / name


@pytest.mark.parametrize("overlay", kube.SERVICE_OVERLAYS)
def test_secret_files_are_read_only_and_not_world_readable(
    rendered: dict[str, list[kube.Doc]], overlay: str
) -> None:
    for deployment in kube.of_kind(rendered[overlay], "Deployment"):
        pod = kube.pod_spec(deployment)
        secrets = {v["name"] for v in pod.get("volumes", []) if "secret" in v}
        for volume in pod.get("volumes", []):
            if "secret" in volume:
                assert volume["secret"]["defaultMode"] & 0o007 == 0, volume["name"]
        for container in pod["containers"]:
            for mount in container.get("volumeMounts", []):
                if mount["name"] in secrets:
                    assert mount.get("readOnly") is True, mount["name"]


@pytest.mark.parametrize("path", kube.KUSTOMIZATIONS)
def test_production_mode_always_comes_with_mutual_tls(
    rendered: dict[str, list[kube.Doc]], path: str
) -> None:
    """The kit refuses TOOLMESH_ENV=production without mTLS: no manifest may ask for that."""
    docs = rendered[path]
    for deployment in toolmesh_deployments(docs):
        (container,) = kube.pod_spec(deployment)["containers"]
        env = kube.config_env(docs, container)
        if env.get("TOOLMESH_ENV") != "production":
            assert "TOOLMESH_TLS_CERT_FILE" not in env
            assert container["readinessProbe"]["grpc"]["port"] == grpc_port(container)
            continue
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        for kind in ("CERT", "KEY", "CA"):
            file = env[f"TOOLMESH_TLS_{kind}_FILE"]
            assert file.rsplit("/", 1)[0] in mounts, (path, file)


@pytest.mark.parametrize("path", kube.KUSTOMIZATIONS)
def test_production_replicas_never_migrate_the_schema_themselves(
    rendered: dict[str, list[kube.Doc]], path: str
) -> None:
    """In production the migration Job changes the schema; a replica only checks it."""
    docs = rendered[path]
    for deployment in toolmesh_deployments(docs):
        (container,) = kube.pod_spec(deployment)["containers"]
        env = kube.config_env(docs, container)
        if env.get("TOOLMESH_ENV") == "production":
            assert env.get("TOOLMESH_MIGRATE_ON_START") == "false", (path, service_of(deployment))


@pytest.mark.parametrize("app", kube.SERVICES)
def test_each_service_ships_alone_in_production(
    rendered: dict[str, list[kube.Doc]], app: str
) -> None:
    docs = rendered[f"overlays/prod/{app}"]
    kinds = sorted(d["kind"] for d in docs)
    assert kinds.count("Deployment") == 1
    for kind in (
        "ConfigMap",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "ServiceAccount",
        "NetworkPolicy",
        "Service",
    ):
        assert kind in kinds, (app, kind)
    (deployment,) = kube.of_kind(docs, "Deployment")
    (container,) = kube.pod_spec(deployment)["containers"]
    assert kube.config_env(docs, container)["TOOLMESH_ENV"] == "production"
    # The same manifests as in the whole-mesh prod overlay.
    whole = kube.by_name(rendered["overlays/prod"], "Deployment", app)
    assert whole == deployment


@pytest.mark.parametrize("path", kube.KUSTOMIZATIONS)
def test_every_referenced_service_account_is_rendered_alongside(
    rendered: dict[str, list[kube.Doc]], path: str
) -> None:
    """A Deployment or Job whose ServiceAccount is missing is never created."""
    docs = rendered[path]
    accounts = {a["metadata"]["name"] for a in kube.of_kind(docs, "ServiceAccount")}
    for workload in docs:
        if workload["kind"] in ("Deployment", "Job"):
            assert kube.pod_spec(workload)["serviceAccountName"] in accounts, (
                path,
                workload["metadata"]["name"],
            )


# Configuration files each service reloads without a restart: setting -> packaged file.
RELOADED_FILES = {
    "router": {"TOOLMESH_ROUTER_RULES_FILE": REPO_FILES / "services/router/routing.toml"},
    "telemetry": {
        "TOOLMESH_TELEMETRY_PRICES_FILE": REPO_FILES / "services/telemetry/prices.toml",
        "TOOLMESH_TELEMETRY_SLO_FILE": REPO_FILES / "services/telemetry/slo.toml",
    },
}


@pytest.mark.parametrize("overlay", kube.SERVICE_OVERLAYS)
def test_reloaded_files_come_from_a_configmap_updated_in_place(
    rendered: dict[str, list[kube.Doc]], overlay: str
) -> None:
    """Routing rules, prices and SLOs are mounted from a ConfigMap without a hash suffix (an
    edit must reach the running pods, not roll them) as a whole directory (a subPath mount
    never sees an update), and start as the image's own files."""
    docs = rendered[overlay]
    for service, settings in RELOADED_FILES.items():
        deployment = kube.by_name(docs, "Deployment", service)
        pod = kube.pod_spec(deployment)
        (container,) = pod["containers"]
        env = kube.config_env(docs, container)
        volumes = {v["name"]: v for v in pod["volumes"]}
        for setting, packaged in settings.items():
            path = Path(env[setting])
            (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(path.parent)]
            assert "subPath" not in mount and mount.get("readOnly") is True
            configmap = kube.by_name(docs, "ConfigMap", volumes[mount["name"]]["configMap"]["name"])
            assert configmap["metadata"]["name"] == f"{service}-files"
            assert configmap["data"][path.name] == packaged.read_text(), setting
        if service == "router":
            assert env["TOOLMESH_ROUTER_RULES_DIR"] == str(
                Path(env["TOOLMESH_ROUTER_RULES_FILE"]).parent
            )
