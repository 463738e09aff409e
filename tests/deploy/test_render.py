"""Each kustomization renders offline; every manifest validates against the schema."""

from __future__ import annotations

import copy

import pytest

from tests.deploy import kube

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate ships the schemas offline"
)
# Schemas shipped in the wheel: the oldest Kubernetes we support (native gRPC probes GA in
# 1.27, preStop sleep on by default since 1.30; 1.33 is the oldest release still patched) and
# the newest the wheel knows.
K8S_VERSIONS = ["1.33.0", "1.37.0"]


def validate(doc: kube.Doc) -> None:
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("path", kube.KUSTOMIZATIONS)
def test_kustomization_renders(rendered: dict[str, list[kube.Doc]], path: str) -> None:
    assert rendered[path], f"{path} rendered no resources"


@pytest.mark.parametrize("path", kube.KUSTOMIZATIONS)
def test_every_manifest_validates_against_the_schema(
    rendered: dict[str, list[kube.Doc]], path: str
) -> None:
    failures = []
    for doc in rendered[path]:
        try:
            validate(doc)
        except kubernetes_validate.ValidationError as error:
            failures.append(f"{doc['kind']}/{doc['metadata']['name']}: {error.message}")
    assert not failures, "\n".join(failures)


def test_the_validator_rejects_a_broken_deployment(rendered: dict[str, list[kube.Doc]]) -> None:
    """Proof that the schema check above can fail: strict mode refuses an unknown field."""
    deployment = copy.deepcopy(kube.by_name(rendered["overlays/prod"], "Deployment", "gateway"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grcp"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)
    deployment = copy.deepcopy(kube.by_name(rendered["overlays/prod"], "Deployment", "gateway"))
    deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "x"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)


@pytest.mark.parametrize("overlay", kube.SERVICE_OVERLAYS)
def test_overlay_ships_the_five_services_the_mcp_face_and_the_collector(
    rendered: dict[str, list[kube.Doc]], overlay: str
) -> None:
    names = {d["metadata"]["name"] for d in kube.of_kind(rendered[overlay], "Deployment")}
    assert names == {*kube.SERVICES, kube.FACE, "otel-collector"}
    for doc in rendered[overlay]:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "toolmesh", doc["metadata"]["name"]


@pytest.mark.parametrize("env", ["dev", "prod"])
def test_migrations_run_one_job_per_database_owner_with_the_release_image(
    rendered: dict[str, list[kube.Doc]], env: str
) -> None:
    jobs = kube.of_kind(rendered[f"overlays/{env}/migrations"], "Job")
    # Production also migrates the gateway's outbox database.
    owners = [*kube.DB_SERVICES, *(["gateway"] if env == "prod" else [])]
    assert sorted(j["metadata"]["name"] for j in jobs) == sorted(f"{s}-migrate" for s in owners)
    service_images = {
        c["image"]
        for _, c in kube.containers(rendered[f"overlays/{env}"])
        if c["image"].startswith(kube.TOOLMESH_IMAGE)
    }
    for job in jobs:
        service = job["metadata"]["name"].removesuffix("-migrate")
        (container,) = kube.pod_spec(job)["containers"]
        assert container["command"] == ["toolmesh"]
        assert container["args"] == ["migrate", "--service", service]
        assert kube.pod_spec(job)["restartPolicy"] == "Never"
        # Schema and code move together: the Job runs the image the Deployments run.
        assert {container["image"]} == service_images
        refs = [e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e]
        assert refs == [{"name": f"{service}-database", "key": "url"}]
