"""The KubeRay manifests (issue 19 part 3) are valid RayCluster / RayService objects by KubeRay's own CRD schemas
(ray.io/v1 of KubeRay 1.7.0, vendored in deploy/kuberay/schemas/ by scripts/vendor_kuberay_schemas.py: CI reaches no
GitHub), checked strictly as `kubectl apply --validate=strict` would (an unknown field is an error); they run the
locked Ray on the two images as uid 1000, and the RayService serves exactly serve_configs/gpu.yaml. Reads files."""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft202012Validator

from tests.deploy.locks import REPO, lock_pins

KUBERAY = REPO / "deploy" / "kuberay"
MANIFESTS = {"RayCluster": KUBERAY / "raycluster.yaml", "RayService": KUBERAY / "rayservice.yaml"}
IMAGE_SUFFIX = {"cpu": "-cpu", "gpu": "-gpu"}  # registry.example.com/mobile-vla:<version>-<cpu|gpu>


def strict(schema: dict) -> dict:
    """A copy of an OpenAPI schema in which objects with declared properties admit no others (kubectl's strict
    field validation; the API server would otherwise drop a misspelt field without a word)."""
    schema = copy.deepcopy(schema)
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if (
                node.get("type") == "object"
                and "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return schema


@cache
def validator(kind: str) -> Draft202012Validator:
    document = json.loads((KUBERAY / "schemas" / f"{kind.lower()}.ray.io_v1.json").read_text())
    assert document["source"]["version"] == "ray.io/v1"
    return Draft202012Validator(strict(document["openAPIV3Schema"]))


def errors(kind: str, manifest: dict) -> list[str]:
    """Schema errors of one manifest, as 'path: message' lines."""
    found = sorted(validator(kind).iter_errors(manifest), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in found]


def load(kind: str) -> dict:
    return yaml.safe_load(MANIFESTS[kind].read_text())


def cluster_spec(kind: str) -> dict:
    manifest = load(kind)
    return manifest["spec"] if kind == "RayCluster" else manifest["spec"]["rayClusterConfig"]


def pod_templates(kind: str) -> dict[str, dict]:
    """group name ('head' for the head) -> its pod spec."""
    spec = cluster_spec(kind)
    pods = {"head": spec["headGroupSpec"]["template"]["spec"]}
    pods.update({g["groupName"]: g["template"]["spec"] for g in spec["workerGroupSpecs"]})
    return pods


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_manifest_is_valid_by_kuberay_crd_schema(kind):
    manifest = load(kind)
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", kind)
    assert errors(kind, manifest) == []


def test_schema_check_catches_a_misspelt_field_and_a_wrong_type():
    manifest = load("RayCluster")
    group = manifest["spec"]["workerGroupSpecs"][0]
    group["maxReplica"] = group.pop("maxReplicas")  # misspelt (and so the required maxReplicas is missing)
    group["minReplicas"] = "0"
    found = errors("RayCluster", manifest)
    assert any("'maxReplicas' is a required property" in e for e in found), found
    assert any("'maxReplica' was unexpected" in e for e in found), found
    assert any(e.startswith("spec.workerGroupSpecs.0.minReplicas: '0' is not of type 'integer'") for e in found)


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_cluster_runs_the_locked_ray_on_the_project_images_as_non_root(kind):
    assert cluster_spec(kind)["rayVersion"] == lock_pins("gpu")["ray"] == lock_pins("cpu")["ray"]
    assert cluster_spec(kind)["authOptions"]["mode"] == "token"
    for group, pod in pod_templates(kind).items():
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1000
        (container,) = pod["containers"]
        limits = container["resources"]["limits"]
        image = "gpu" if "nvidia.com/gpu" in limits else "cpu"  # GPU pods run the GPU image, the rest the CPU one
        assert container["image"].split("/")[-1].startswith("mobile-vla:"), (group, container["image"])
        assert container["image"].endswith(IMAGE_SUFFIX[image]), (group, container["image"])
        volumes = {v["name"] for v in pod["volumes"]}
        assert {m["name"] for m in container["volumeMounts"]} <= volumes, group
    assert cluster_spec(kind)["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no work on the head


def test_rayservice_serves_the_gpu_serve_config():
    served = yaml.safe_load(load("RayService")["spec"]["serveConfigV2"])
    assert served == yaml.safe_load((REPO / "serve_configs" / "gpu.yaml").read_text()), (
        "deploy/kuberay/rayservice.yaml serveConfigV2 differs from serve_configs/gpu.yaml: edit both"
    )


def test_rayservice_mounts_what_the_serve_config_points_at():
    served = yaml.safe_load(load("RayService")["spec"]["serveConfigV2"])
    env = served["applications"][0]["runtime_env"]["env_vars"]
    paths = [env["MOBILE_VLA_TOKENS_FILE"], env["MOBILE_VLA_MEMORY_SECRET_FILE"], env["MOBILE_VLA_HOME"]]
    gpu_pods = [pod for pod in pod_templates("RayService").values() if "nvidia.com/gpu" in str(pod)]
    assert gpu_pods
    for pod in gpu_pods:
        mounts = [m["mountPath"] for m in pod["containers"][0]["volumeMounts"]]
        for path in paths:
            assert any(Path(path).is_relative_to(mount) for mount in mounts), (path, mounts)
