"""Operator smoke job: does every node run the code we shipped, and what can the cluster offer?

    ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env clusters/runtime_env.yaml -- python jobs/cluster_check.py \
        [--storage-path s3://BUCKET/ray_results] [--mlflow] [--gpu]

Run it after `ray up`, after changing the runtime env, or when a job fails in a way that smells of
the environment. It imports `mobile_vla` on the driver and on every alive node and says where each
copy came from (the runtime env's py_module, not a copy installed on the node), shows the
cluster's resources, and optionally checks the shared storage every node must see (Ray Train's
`storage_path`), the MLflow server (reachable, credentials accepted) and one GPU worker (CUDA,
ONNX Runtime providers, TensorRT). It exits 1 with one line per problem, so CI can gate on it; the
last line is `CLUSTER_CHECK {json}` for scripts.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
import uuid

REPORT_PREFIX = "CLUSTER_CHECK "


def describe_package() -> dict:
    """What this process imports as `mobile_vla`: version, location, subpackages."""
    import pkgutil
    import platform as python_platform
    from pathlib import Path

    import mobile_vla

    package_dir = Path(mobile_vla.__file__).resolve().parent
    return {
        "hostname": socket.gethostname(),
        "python": python_platform.python_version(),
        "mobile_vla_version": mobile_vla.__version__,
        "mobile_vla_path": str(package_dir),
        "subpackages": sorted(m.name for m in pkgutil.iter_modules([str(package_dir)]) if m.ispkg),
    }


def read_marker(storage_path: str | None, marker: str | None) -> str | None:
    """Reads the marker file the driver wrote; None when it is absent or unreadable here."""
    if not storage_path or not marker:
        return None
    import pyarrow.fs

    try:
        fs, root = pyarrow.fs.FileSystem.from_uri(storage_path)
        with fs.open_input_stream(f"{root.rstrip('/')}/{marker}") as stream:
            return stream.read().decode()
    except (OSError, ValueError):
        return None


def write_marker(storage_path: str) -> tuple[str, str]:
    import pyarrow.fs

    marker = f".cluster_check/{uuid.uuid4().hex}"
    content = f"written by {socket.gethostname()} at {time.time():.0f}"
    fs, root = pyarrow.fs.FileSystem.from_uri(storage_path)
    fs.create_dir(f"{root.rstrip('/')}/.cluster_check", recursive=True)
    with fs.open_output_stream(f"{root.rstrip('/')}/{marker}") as stream:
        stream.write(content.encode())
    return marker, content


def delete_marker(storage_path: str, marker: str) -> None:
    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(storage_path)
    fs.delete_file(f"{root.rstrip('/')}/{marker}")


def probe_node(storage_path: str | None, marker: str | None) -> dict:
    report = describe_package()
    report["storage_marker"] = read_marker(storage_path, marker)
    return report


def probe_gpu() -> dict:
    """Runs on a worker holding one GPU: the stack the GPU backends need, as the node sees it."""
    import torch

    report = describe_package()
    report["cuda_available"] = torch.cuda.is_available()
    report["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    try:
        import onnxruntime

        report["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except ImportError as exc:
        report["onnxruntime_providers"] = f"import failed: {exc}"
    try:
        import tensorrt

        report["tensorrt"] = tensorrt.__version__
    except ImportError as exc:
        report["tensorrt"] = f"import failed: {exc}"
    return report


def check_mlflow() -> dict:
    """Talks to the tracking server the platform would use (auth included)."""
    import mlflow

    from mobile_vla.tracking import configure_mlflow

    uri = configure_mlflow()
    experiments = mlflow.search_experiments(max_results=5)
    return {"tracking_uri": uri, "experiments_seen": len(experiments)}


def run_checks(args: argparse.Namespace) -> tuple[dict, list[str]]:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ray.init(log_to_driver=False)
    problems: list[str] = []
    driver = describe_package()
    report: dict = {
        "driver": driver,
        "cluster_resources": ray.cluster_resources(),
        "available_resources": ray.available_resources(),
    }

    marker = content = None
    if args.storage_path:
        marker, content = write_marker(args.storage_path)

    alive = [node for node in ray.nodes() if node["Alive"]]
    remote_probe = ray.remote(num_cpus=0)(probe_node)
    pending = {
        node["NodeID"]: remote_probe.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        ).remote(args.storage_path, marker)
        for node in alive
    }
    nodes = []
    for node in alive:
        node_id = node["NodeID"]
        try:
            seen = ray.get(pending[node_id], timeout=args.timeout_s)
        except Exception as exc:  # an import error on that node, a dead node, a timeout
            problems.append(f"node {node['NodeManagerAddress']}: probe failed: {exc!r}"[:500])
            continue
        seen.update(node_id=node_id, address=node["NodeManagerAddress"], resources=node["Resources"])
        nodes.append(seen)
        if seen["mobile_vla_version"] != driver["mobile_vla_version"]:
            problems.append(
                f"node {seen['address']}: mobile_vla {seen['mobile_vla_version']} "
                f"!= driver's {driver['mobile_vla_version']}"
            )
        if seen["subpackages"] != driver["subpackages"]:
            problems.append(
                f"node {seen['address']}: subpackages {seen['subpackages']} != driver's {driver['subpackages']}"
            )
        if args.storage_path and seen["storage_marker"] != content:
            problems.append(
                f"node {seen['address']}: cannot read {args.storage_path}/{marker}: "
                "storage_path is not shared with this node"
            )
    report["nodes"] = nodes
    if args.storage_path and marker:
        delete_marker(args.storage_path, marker)
        report["storage_path"] = args.storage_path

    if args.mlflow:
        try:
            report["mlflow"] = check_mlflow()
        except Exception as exc:
            problems.append(f"mlflow: {exc!r}"[:500])

    if args.gpu:
        try:
            gpu = ray.get(ray.remote(num_gpus=1)(probe_gpu).remote(), timeout=args.gpu_timeout_s)
            report["gpu"] = gpu
            if not gpu["cuda_available"]:
                problems.append(f"gpu node {gpu['hostname']}: torch sees no CUDA device")
            if "CUDAExecutionProvider" not in gpu["onnxruntime_providers"]:
                problems.append(
                    f"gpu node {gpu['hostname']}: onnxruntime has no CUDAExecutionProvider "
                    f"({gpu['onnxruntime_providers']}): install the package with the gpu extra"
                )
        except ray.exceptions.GetTimeoutError:
            problems.append(
                f"gpu: no worker with a free GPU within {args.gpu_timeout_s:.0f} s "
                "(autoscaler bounds, quotas, or the node failed its setup: see `ray monitor`)"
            )
    return report, problems


def print_summary(report: dict, problems: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    driver = report["driver"]
    console.print(
        f"mobile_vla {driver['mobile_vla_version']} from {driver['mobile_vla_path']} "
        f"(python {driver['python']}, driver on {driver['hostname']})"
    )
    resources = report["cluster_resources"]
    console.print(
        "cluster: "
        + ", ".join(f"{key}={resources.get(key, 0):g}" for key in ("CPU", "GPU", "memory"))
        + f" · {len(report['nodes'])} node(s)"
    )
    table = Table("node", "CPU", "GPU", "mobile_vla", "imported from")
    for node in report["nodes"]:
        table.add_row(
            f"{node['address']} ({node['hostname']})",
            f"{node['resources'].get('CPU', 0):g}",
            f"{node['resources'].get('GPU', 0):g}",
            node["mobile_vla_version"],
            node["mobile_vla_path"],
        )
    console.print(table)
    if "gpu" in report:
        gpu = report["gpu"]
        console.print(
            f"gpu: {gpu['cuda_devices']} · onnxruntime {gpu['onnxruntime_providers']} · tensorrt {gpu['tensorrt']}"
        )
    if "mlflow" in report:
        console.print(f"mlflow: {report['mlflow']['tracking_uri']} answers")
    for problem in problems:
        console.print(f"[red]problem:[/red] {problem}")
    console.print("OK" if not problems else f"{len(problems)} problem(s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--storage-path", help="URI or path every node must share (Ray Train storage_path)")
    parser.add_argument("--mlflow", action="store_true", help="check the MLflow tracking server answers")
    parser.add_argument("--gpu", action="store_true", help="run one probe on a GPU worker (may autoscale)")
    parser.add_argument("--timeout-s", type=float, default=120.0, help="per-node probe timeout")
    parser.add_argument("--gpu-timeout-s", type=float, default=900.0, help="wait for a GPU worker")
    args = parser.parse_args(argv)

    report, problems = run_checks(args)
    report["problems"] = problems
    print_summary(report, problems)
    print(REPORT_PREFIX + json.dumps(report, sort_keys=True), flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
