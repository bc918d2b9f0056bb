"""Operator smoke job: does every node run the code we shipped, and what can the cluster offer?

    ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env clusters/runtime_env.yaml -- python jobs/cluster_check.py \
        [--storage-path s3://BUCKET/ray_results] [--mlflow] [--gpu]

Run it after `ray up`, after changing the runtime env, or when a job fails in a way that smells of
the environment. It imports `mobile_vla` on the driver and on every alive node and says where each
copy came from (the runtime env's py_module, not a copy installed on the node), shows the
cluster's resources, and optionally checks the shared storage every node must see (Ray Train's
`storage_path`), the MLflow server (reachable, credentials accepted) and one GPU worker. On that
worker it proves the GPU stack rather than listing it: torch sees CUDA; an ONNX Runtime session asked
for CUDA (opened the way serving opens one: preloaded CUDA libraries, memory limit) runs with
CUDAExecutionProvider FIRST in `session.get_providers()` (onnxruntime falls back to the CPU silently
when the CUDA libraries do not load); and, when `tensorrt` imports, a one-layer TensorRT network is
built, run and compared. It exits 1 with one line per problem, so CI can gate on it; the last line
is `CLUSTER_CHECK {json}` for scripts.
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


def run_cuda_session() -> dict:
    """A one-node ONNX graph (y = relu(x)) in an ONNX Runtime session asked for CUDA, opened the way
    serving opens one (`session_providers`: preloaded CUDA libraries, memory limit, arena strategy).

    Returns:
        requested: the providers asked for; providers: `session.get_providers()` (what it runs on);
        correct: whether the output is relu(x).
    """
    import numpy as np
    import onnx
    import onnxruntime
    from onnx import TensorProto, helper

    from mobile_vla.runtime.onnx_backend import CUDA_PROVIDER, session_providers

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "cluster_check",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what every supported onnxruntime reads
    requested = [CUDA_PROVIDER, "CPUExecutionProvider"]
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(
        onnx.shape_inference.infer_shapes(model).SerializeToString(), options, providers=session_providers(requested)
    )
    x = np.array([[-1, 0, 1, 2], [3, -4, 5, -6]], np.float32)
    (y,) = session.run(["y"], {"x": x})
    return {
        "requested": requested,
        "providers": session.get_providers(),
        "correct": bool(np.array_equal(y, np.maximum(x, 0))),
    }


def cuda_fallback_problem(session: dict) -> str | None:
    """The problem when a session asked for CUDA does not run on it first (ONNX Runtime's silent CPU fallback)."""
    wanted = session["requested"][0]
    providers = session["providers"]
    if not providers or providers[0] != wanted:
        return (
            f"onnxruntime session asked for {wanted} runs on {providers}: silent CPU fallback (the CUDA/cuDNN "
            "libraries did not load; check onnxruntime-gpu's CUDA major against the driver and torch's)"
        )
    if not session["correct"]:
        return f"onnxruntime session on {providers[0]} computed a wrong relu"
    return None


def run_tensorrt_network() -> dict:
    """Builds, runs and checks a one-layer TensorRT network (y = relu(x), 2x4) on this GPU."""
    import tensorrt as trt
    import torch

    from mobile_vla.export.tensorrt_engine import tensorrt_logger

    logger = tensorrt_logger()
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    layer = network.add_activation(network.add_input("x", trt.float32, (2, 4)), trt.ActivationType.RELU)
    layer.get_output(0).name = "y"
    network.mark_output(layer.get_output(0))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 1 << 28)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("build_serialized_network returned None (see the TensorRT log)")
    engine = trt.Runtime(logger).deserialize_cuda_engine(serialized)
    if engine is None:
        raise RuntimeError("deserialize_cuda_engine returned None")
    context = engine.create_execution_context()
    x = torch.tensor([[-1.0, 0.0, 1.0, 2.0], [3.0, -4.0, 5.0, -6.0]], device="cuda")
    y = torch.full_like(x, float("nan"))
    torch.cuda.synchronize()  # x and y are written on the default stream; the network runs on its own
    stream = torch.cuda.Stream()
    for name, tensor in (("x", x), ("y", y)):
        if not context.set_tensor_address(name, tensor.data_ptr()):
            raise RuntimeError(f"set_tensor_address({name!r}) refused")
    if not context.execute_async_v3(stream.cuda_stream):
        raise RuntimeError("execute_async_v3 failed")
    stream.synchronize()
    return {"version": trt.__version__, "correct": bool(torch.equal(y, torch.relu(x)))}


def probe_gpu() -> dict:
    """Runs on a worker holding one GPU: proves the stack the GPU backends need (module docstring)."""
    import torch

    report = describe_package()
    report["cuda_available"] = torch.cuda.is_available()
    report["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    try:
        import onnxruntime

        report["onnxruntime_providers"] = onnxruntime.get_available_providers()
        report["onnxruntime_cuda_session"] = run_cuda_session()
    except Exception as exc:  # an import error, a provider that failed to initialise
        report["onnxruntime_providers"] = report.get("onnxruntime_providers", [])
        report["onnxruntime_error"] = f"{type(exc).__name__}: {exc}"[:500]
    try:
        import tensorrt
    except ImportError as exc:
        report["tensorrt"] = f"import failed: {exc}"
    else:
        report["tensorrt"] = getattr(tensorrt, "__version__", "stub")
        try:
            report["tensorrt_network"] = run_tensorrt_network()
        except Exception as exc:  # the stub package, a build or run failure
            report["tensorrt_network"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    return report


def gpu_problems(gpu: dict) -> list[str]:
    """One line per way the GPU worker's stack falls short (see probe_gpu)."""
    host = gpu["hostname"]
    problems = []
    if not gpu["cuda_available"]:
        problems.append(f"gpu node {host}: torch sees no CUDA device")
    if "CUDAExecutionProvider" not in gpu["onnxruntime_providers"]:
        problems.append(
            f"gpu node {host}: onnxruntime has no CUDAExecutionProvider "
            f"({gpu['onnxruntime_providers']}): install the package with the gpu extra"
        )
    if "onnxruntime_error" in gpu:
        problems.append(f"gpu node {host}: onnxruntime CUDA session failed: {gpu['onnxruntime_error']}")
    elif "onnxruntime_cuda_session" in gpu:
        problem = cuda_fallback_problem(gpu["onnxruntime_cuda_session"])
        if problem:
            problems.append(f"gpu node {host}: {problem}")
    network = gpu.get("tensorrt_network")
    if network is not None and "error" in network:
        problems.append(f"gpu node {host}: TensorRT one-layer network failed: {network['error']}")
    elif network is not None and not network["correct"]:
        problems.append(f"gpu node {host}: TensorRT one-layer network computed a wrong relu")
    return problems


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
            problems.extend(gpu_problems(gpu))
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
        session = gpu.get("onnxruntime_cuda_session", {}).get("providers", gpu.get("onnxruntime_error"))
        console.print(
            f"gpu: {gpu['cuda_devices']} · onnxruntime {gpu['onnxruntime_providers']} (CUDA session runs on "
            f"{session}) · tensorrt {gpu['tensorrt']} (one-layer network: {gpu.get('tensorrt_network', 'not run')})"
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
