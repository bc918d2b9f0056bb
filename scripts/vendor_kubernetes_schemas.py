"""Extracts the strict JSON schemas of the Kubernetes core types deploy/kuberay/mlflow.yaml uses (apps/v1 Deployment,
v1 Service) from a kubernetes-validate wheel into deploy/kuberay/schemas/, for tests/deploy/test_mlflow_manifest.py.
The wheel bundles every type of every Kubernetes release (22.6 MB): too much for a dev dependency, so only the two
kinds travel with the repository, each with just the definitions it reaches. Rerun it to move to another release:

    pip download --no-deps kubernetes-validate==1.37.0 -d /tmp/kv
    python scripts/vendor_kubernetes_schemas.py /tmp/kv/kubernetes_validate-1.37.0-py3-none-any.whl --kubernetes v1.34.0

The schemas are kubernetes-validate's conversion (Apache-2.0, https://github.com/willthames/kubernetes-validate) of
Kubernetes' own OpenAPI definitions (Apache-2.0, https://github.com/kubernetes/kubernetes), copied unchanged but
for the $ref prefix ("/api/_definitions.json#/$defs/X" becomes "#/$defs/X": one self-contained file per kind).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import zipfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "deploy" / "kuberay" / "schemas"
KINDS = {"Deployment": "deployment-apps-v1", "Service": "service-v1"}  # kind -> file stem in the wheel
_REF = re.compile(r"^(?:/api/_definitions\.json)?#/\$defs/(.+)$")


def _refs(node: object) -> set[str]:
    """The definition names a schema node refers to, anywhere inside it."""
    found: set[str] = set()
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            ref = item.get("$ref")
            if isinstance(ref, str):
                match = _REF.match(ref)
                if match is None:
                    raise ValueError(f"$ref {ref!r}: not a reference into _definitions.json")
                found.add(match.group(1))
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


def _local(node: object) -> object:
    """A copy of a schema node with every '/api/_definitions.json#/$defs/X' $ref made '#/$defs/X'."""
    if isinstance(node, dict):
        return {k: ("#/$defs/" + _REF.match(v).group(1) if k == "$ref" else _local(v)) for k, v in node.items()}
    if isinstance(node, list):
        return [_local(v) for v in node]
    return node


def extract(wheel: Path, kubernetes: str) -> dict[str, dict]:
    """kind -> a self-contained schema document: the kind's strict schema, the definitions it reaches, its source."""
    folder = f"kubernetes_validate/kubernetes-json-schema/{kubernetes}-local-strict"
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    with zipfile.ZipFile(wheel) as archive:
        definitions = json.loads(archive.read(f"{folder}/_definitions.json"))["$defs"]
        documents = {}
        for kind, stem in KINDS.items():
            schema = json.loads(archive.read(f"{folder}/{stem}.json"))
            needed, todo = set(), _refs(schema)
            while todo:
                name = todo.pop()
                if name not in needed:
                    needed.add(name)
                    todo |= _refs(definitions[name])
            schema = _local(schema)
            schema["$defs"] = {name: _local(definitions[name]) for name in sorted(needed)}
            source = {
                "project": "https://github.com/willthames/kubernetes-validate (Apache-2.0), converting Kubernetes' "
                "OpenAPI definitions (https://github.com/kubernetes/kubernetes, Apache-2.0)",
                "wheel": wheel.name,
                "wheel_sha256": digest,
                "file": f"{folder}/{stem}.json",
                "kubernetes": kubernetes,
                "kind": kind,
            }
            documents[kind] = {"source": source, "schema": schema}
    return documents


def main() -> None:
    """Writes deploy/kuberay/schemas/<kind>.<group_version>.json for each kind in KINDS."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wheel", type=Path, help="a kubernetes-validate wheel (pip download --no-deps)")
    parser.add_argument("--kubernetes", required=True, help="the Kubernetes release to take, e.g. v1.34.0")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    for kind, document in extract(args.wheel, args.kubernetes).items():
        out = OUT / f"{KINDS[kind].replace('-', '.', 1).replace('-', '_')}.json"
        out.write_text(json.dumps(document, sort_keys=True, separators=(",", ":")) + "\n")
        print(f"{out}: {kind} of Kubernetes {args.kubernetes}, {len(document['schema']['$defs'])} definitions")


if __name__ == "__main__":
    main()
