"""Kubernetes manifests (deploy/k8s): they parse, validate against the Kubernetes schema, and say what
the service needs (GPU, probes on the right routes, ports, settings that exist, the admin token from a Secret)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from service.settings import Settings

K8S = Path(__file__).resolve().parents[1] / "deploy" / "k8s"
KUBERNETES_VERSION = "1.30.0"  # the oldest release we support; the schemas are bundled (no network)


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def resources() -> dict[str, dict]:
    """kind -> resource, over every manifest (each kind appears once)."""
    found: dict[str, dict] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in documents(path):
            assert doc["kind"] not in found, f"{doc['kind']} defined twice"
            found[doc["kind"]] = doc
    return found


def settings_env() -> set[str]:
    return {f"MMAP_{name.upper()}" for name in Settings.model_fields}


def test_every_manifest_parses_and_kustomization_lists_them():
    kustomization = documents(K8S / "kustomization.yaml")[0]
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert listed == on_disk
    assert all(r.get("metadata", {}).get("name") for k, r in resources().items() if k != "Kustomization")


@pytest.mark.parametrize("path", sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"))
def test_manifest_is_valid_against_the_kubernetes_schema(path):
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    for doc in documents(K8S / path):
        # strict: unknown fields (typos such as `readinesProbe`) fail too
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_deployment_asks_for_a_gpu_and_probes_the_service_routes():
    deployment = resources()["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    port = container["ports"][0]
    assert (port["name"], port["containerPort"]) == ("http", 8000)
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # backbone load + weight download
    env = {e["name"]: e for e in container["env"]}
    assert env["MMAP_HOST"]["value"] == "0.0.0.0" and env["MMAP_PORT"]["value"] == str(port["containerPort"])
    secret = env["MMAP_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert secret["name"] == resources()["Secret"]["metadata"]["name"] and secret["key"] == "MMAP_ADMIN_TOKEN"
    assert [s["configMapRef"]["name"] for s in container["envFrom"]] == [resources()["ConfigMap"]["metadata"]["name"]]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001


def test_prompt_sets_come_from_the_shared_volume_the_config_names():
    found = resources()
    pod = found["Deployment"]["spec"]["template"]["spec"]
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    prompts_dir = found["ConfigMap"]["data"]["MMAP_PROMPTS"]
    (name,) = [n for n, m in mounts.items() if m["mountPath"] == prompts_dir]
    assert mounts[name]["readOnly"] is True
    assert volumes[name]["persistentVolumeClaim"]["claimName"] == found["PersistentVolumeClaim"]["metadata"]["name"]
    assert "ReadWriteMany" in found["PersistentVolumeClaim"]["spec"]["accessModes"]
    # the root filesystem is read-only: everything the service writes must be a volume
    assert pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    assert {"/cache", "/tmp"} <= {m["mountPath"] for m in mounts.values()}
    # the HTTP workers' pixel rings live in /dev/shm: memory-backed and larger than a container's 64 MB default
    (shm,) = [n for n, m in mounts.items() if m["mountPath"] == "/dev/shm"]
    assert volumes[shm]["emptyDir"]["medium"] == "Memory"


def test_config_sets_only_real_settings_with_valid_values():
    data = resources()["ConfigMap"]["data"]
    assert set(data) <= settings_env(), set(data) - settings_env()
    assert all(isinstance(v, str) for v in data.values())  # a ConfigMap holds strings only
    values = {k.removeprefix("MMAP_").lower(): v for k, v in data.items()}
    Settings(**values)  # pydantic validates every value as the service would


def test_service_autoscaler_and_budget_select_the_deployment():
    found = resources()
    labels = found["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert found["Deployment"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert found["Service"]["spec"]["selector"].items() <= labels.items()
    assert found["Service"]["spec"]["ports"][0]["targetPort"] == "http"
    assert found["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert (found["PodDisruptionBudget"]["spec"]["minAvailable"]
            < found["HorizontalPodAutoscaler"]["spec"]["minReplicas"])
    target = found["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", found["Deployment"]["metadata"]["name"])


def test_the_schema_check_catches_a_misspelt_field():
    """The validator really validates offline: a typo that kubectl would reject fails here."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    deployment = resources()["Deployment"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
