"""Extracts the OpenAPI schemas of KubeRay's RayCluster and RayService (ray.io/v1) from its CRD files into
deploy/kuberay/schemas/, for tests/deploy/test_kuberay.py (CI reaches no GitHub, so the schemas travel with the
repository). Run it with a KubeRay checkout's CRDs after moving to another KubeRay release:

    python scripts/vendor_kuberay_schemas.py --release v1.7.0 --commit <sha> \\
        KUBERAY/ray-operator/config/crd/bases/ray.io_rayclusters.yaml \\
        KUBERAY/ray-operator/config/crd/bases/ray.io_rayservices.yaml

The schemas are copied as KubeRay generates them (Apache-2.0, https://github.com/ray-project/kuberay).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

OUT = Path(__file__).resolve().parents[1] / "deploy" / "kuberay" / "schemas"


def extract(crd_path: Path, release: str, commit: str) -> tuple[str, dict]:
    """A CRD file -> (kind, {"source": ..., "openAPIV3Schema": the ray.io/v1 schema})."""
    crd = yaml.load(crd_path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    kind = crd["spec"]["names"]["kind"]
    versions = {v["name"]: v for v in crd["spec"]["versions"]}
    if "v1" not in versions:
        raise ValueError(f"{crd_path}: no ray.io/v1 version in the CRD (versions: {sorted(versions)})")
    source = {
        "project": "https://github.com/ray-project/kuberay (Apache-2.0)",
        "release": release,
        "commit": commit,
        "file": f"ray-operator/config/crd/bases/ray.io_{crd['spec']['names']['plural']}.yaml",
        "crd": crd["metadata"]["name"],
        "version": "ray.io/v1",
    }
    return kind, {"source": source, "openAPIV3Schema": versions["v1"]["schema"]["openAPIV3Schema"]}


def main() -> None:
    """Writes deploy/kuberay/schemas/<kind>.ray.io_v1.json for each CRD file given."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("crds", nargs="+", type=Path, help="KubeRay CRD YAML files")
    parser.add_argument("--release", required=True, help="the KubeRay release tag the files come from")
    parser.add_argument("--commit", required=True, help="the commit of that release")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    for crd_path in args.crds:
        kind, document = extract(crd_path, args.release, args.commit)
        out = OUT / f"{kind.lower()}.ray.io_v1.json"
        out.write_text(json.dumps(document, sort_keys=True, separators=(",", ":")) + "\n")
        print(f"{out}: {kind} from KubeRay {args.release}")


if __name__ == "__main__":
    main()
