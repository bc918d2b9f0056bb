"""The shared MLflow server on Kubernetes (deploy/kuberay/mlflow.yaml, issue 19 item 8) is a valid apps/v1 Deployment
and v1 Service by Kubernetes' own schemas (v1.34, the strict variants: an unknown field is an error, as with
`kubectl apply --validate=strict`; vendored in deploy/kuberay/schemas/ by scripts/vendor_kubernetes_schemas.py), and
its parts fit together: the Service selects the server's pods on the port it listens on, the Secret keys it reads are
the ones its header comment tells operators to create, its image holds the lock's mlflow with the PostgreSQL driver
and the basic-auth app, and the RayCluster / RayService pods track to that Service. Reads files."""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft202012Validator

from tests.deploy.locks import REQUIREMENTS, lock_pins, project
from tests.deploy.test_kuberay import KUBERAY, MANIFESTS, load, pod_templates

MLFLOW = KUBERAY / "mlflow.yaml"
# kind -> (apiVersion, vendored schema file, the file of kubernetes-validate it comes from)
SCHEMAS = {
    "Deployment": ("apps/v1", "deployment.apps_v1.json", "v1.34.0-local-strict/deployment-apps-v1.json"),
    "Service": ("v1", "service.v1.json", "v1.34.0-local-strict/service-v1.json"),
}
SERVER_SECRET = "mobile-vla-mlflow"  # the server's own Secret; the Ray pods' one is mobile-vla-secrets


@cache
def validator(kind: str) -> Draft202012Validator:
    _, vendored, source = SCHEMAS[kind]
    document = json.loads((KUBERAY / "schemas" / vendored).read_text())
    assert document["source"]["kind"] == kind and document["source"]["file"].endswith(source)
    return Draft202012Validator(document["schema"])


def errors(manifest: dict) -> list[str]:
    """Schema errors of one Deployment or Service, as 'path: message' lines."""
    found = sorted(validator(manifest["kind"]).iter_errors(manifest), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in found]


def objects() -> dict[str, dict]:
    """kind -> the one object of that kind in mlflow.yaml."""
    documents = [d for d in yaml.safe_load_all(MLFLOW.read_text()) if d is not None]
    by_kind = {d["kind"]: d for d in documents}
    assert len(by_kind) == len(documents), "one object of each kind"
    return by_kind


def server() -> dict:
    (container,) = objects()["Deployment"]["spec"]["template"]["spec"]["containers"]
    return container


def flags(container: dict) -> dict[str, str]:
    """--name=value arguments of the container -> {name: value} (a bare --flag maps to '')."""
    out = {}
    for arg in container["args"]:
        assert arg.startswith("--"), arg
        name, _, value = arg[2:].partition("=")
        out[name] = value
    return out


def secret_refs(env: list[dict], secret: str) -> dict[str, str]:
    """environment variable -> key, for every variable read from the named Secret."""
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in env if "secretKeyRef" in e.get("valueFrom", {})}
    return {name: ref["key"] for name, ref in refs.items() if ref["name"] == secret}


def documented_secret_keys() -> list[str]:
    """The keys the header comment tells operators to put in the server's Secret (lines '#   key  description')."""
    comment = [line for line in MLFLOW.read_text().splitlines() if line.startswith("#")]
    start = next(i for i, line in enumerate(comment) if f"Secret {SERVER_SECRET} with these keys" in line)
    keys = []
    for line in comment[start + 1 :]:
        match = re.match(r"#   (\S+)  ", line)
        if match is None:
            if not line.startswith("#    "):  # a deeper-indented continuation (the ini example) belongs to a key
                break
            continue
        keys.append(match.group(1))
    return keys


@pytest.mark.parametrize("kind", sorted(SCHEMAS))
def test_manifest_is_valid_by_the_kubernetes_schema(kind):
    manifest = objects()[kind]
    assert manifest["apiVersion"] == SCHEMAS[kind][0]
    assert errors(manifest) == []


def test_schema_check_catches_a_misspelt_field_and_a_wrong_type():
    deployment = objects()["Deployment"]
    deployment["spec"]["replicas"] = "1"
    probe = deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    probe["httpGet"]["paht"] = probe["httpGet"].pop("path")
    found = errors(deployment)
    assert any(e.startswith("spec.replicas: '1' is not of type") for e in found), found
    assert any("'paht' was unexpected" in e for e in found), found
    service = objects()["Service"]
    service["spec"]["ports"][0]["port"] = "5000"
    assert any(e.startswith("spec.ports.0.port: '5000' is not of type") for e in errors(service))


def test_service_selects_the_server_pods_on_the_port_it_listens_on():
    deployment, service = objects()["Deployment"], objects()["Service"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    container = server()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    (port,) = service["spec"]["ports"]
    target = port["targetPort"]
    assert (ports[target] if isinstance(target, str) else target) == int(flags(container)["port"]) == port["port"]
    assert flags(container)["host"] == "0.0.0.0"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/health" and (get["port"] in ports or get["port"] in ports.values()), probe


def test_server_reads_exactly_the_secret_keys_its_comment_names():
    container = server()
    pod = objects()["Deployment"]["spec"]["template"]["spec"]
    read = set(secret_refs(container["env"], SERVER_SECRET).values())
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    files = {}
    for volume in pod["volumes"]:
        if volume.get("secret", {}).get("secretName") == SERVER_SECRET:
            for item in volume["secret"]["items"]:
                read.add(item["key"])
                files[item["key"]] = Path(mounts[volume["name"]]) / item["path"]
    assert sorted(read) == sorted(documented_secret_keys())
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert Path(env["MLFLOW_AUTH_CONFIG_PATH"]) == files["basic_auth.ini"]  # the basic-auth app finds its config
    assert set(secret_refs(container["env"], SERVER_SECRET)) >= {"MLFLOW_BACKEND_STORE_URI"}
    assert "backend-store-uri" not in flags(container)  # the password stays out of the process arguments


def test_admin_is_the_user_the_ray_pods_send():
    admin = secret_refs(server()["env"], "mobile-vla-secrets")
    assert admin == {"MLFLOW_AUTH_ADMIN_USERNAME": "mlflow_username", "MLFLOW_AUTH_ADMIN_PASSWORD": "mlflow_password"}
    for kind in MANIFESTS:
        for group, pod in pod_templates(kind).items():
            sent = secret_refs(pod["containers"][0]["env"], "mobile-vla-secrets")
            assert sent["MLFLOW_TRACKING_USERNAME"] == admin["MLFLOW_AUTH_ADMIN_USERNAME"], (kind, group)
            assert sent["MLFLOW_TRACKING_PASSWORD"] == admin["MLFLOW_AUTH_ADMIN_PASSWORD"], (kind, group)


def test_ray_pods_track_to_the_service():
    service = objects()["Service"]
    url = f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    allowed = flags(server())["allowed-hosts"].split(",")
    assert f"{service['metadata']['name']}:{service['spec']['ports'][0]['port']}" in allowed  # the server answers it
    for kind in MANIFESTS:
        for group, pod in pod_templates(kind).items():
            env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
            assert env["MLFLOW_TRACKING_URI"] == url, (kind, group)


def test_artifacts_go_through_the_server_to_the_ray_pods_claim():
    container, pod = server(), objects()["Deployment"]["spec"]["template"]["spec"]
    assert flags(container)["serve-artifacts"] == ""  # clients need only the HTTP URI
    destination = Path(flags(container)["artifacts-destination"])
    volumes = pod["volumes"]
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in volumes if "persistentVolumeClaim" in v}
    (mount,) = [m for m in container["volumeMounts"] if destination.is_relative_to(m["mountPath"])]
    ray_head = load("RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]
    ray_claims = {v["persistentVolumeClaim"]["claimName"] for v in ray_head["volumes"] if "persistentVolumeClaim" in v}
    assert claims[mount["name"]] in ray_claims


def test_image_serves_postgresql_with_the_locked_mlflow_as_non_root():
    container, pod = server(), objects()["Deployment"]["spec"]["template"]["spec"]
    ray_head = load("RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert container["image"] == ray_head["image"]  # docker/cpu.Dockerfile: installs requirements/cpu.lock.txt
    pins = lock_pins("cpu")
    assert pins["mlflow"] == lock_pins("dev")["mlflow"]  # the server speaks the clients' version
    assert {"psycopg2-binary", "flask-wtf"} <= pins.keys()  # postgresql+psycopg2:// and --app-name=basic-auth
    assert ".[cpu,mlflow-server]" in (REQUIREMENTS / "cpu.in").read_text()
    assert "mlflow-server" in project()["optional-dependencies"]
    assert "postgresql+psycopg2://" in MLFLOW.read_text()  # the driver the image has, named in the URI
    assert flags(container)["app-name"] == "basic-auth"
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1000
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert {"requests", "limits"} <= container["resources"].keys()
