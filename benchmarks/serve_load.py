"""Serving load benchmark: simulated robots against the real Serve app, plus the in-process limit.

    .venv/bin/python benchmarks/serve_load.py                      # everything below, `small` preset
    .venv/bin/python benchmarks/serve_load.py --preset tiny --quick

Runs, each writing into one JSON (benchmarks/results/serve_load.json):
  inprocess     ONNX Runtime `Backend.predict` closed loop at batch 1..64: the throughput limit.
  http          closed loop: C robots, each sending its next step as soon as the answer arrives
                (max throughput), with dynamic batching and without it (max_batch_size 1).
  open loop     N robots at H Hz each (requests leave on schedule whether or not answers came;
                latency counts from the scheduled time, so queueing shows): the largest N whose
                p99 <= 100 ms and error rate 0.
Proxy modes: `default` (Ray Serve's Python proxy, stock settings), `optimized` (the same proxy with
RAY_SERVE_THROUGHPUT_OPTIMIZED=1: gRPC between proxy and replicas, user code and router on the
replica's own event loop; what `mobile-vla serve` uses) and `haproxy` (RAY_SERVE_ENABLE_HA_PROXY=1 +
RAY_SERVE_THROUGHPUT_OPTIMIZED=1). Each HTTP run is a fresh Ray in a child process; with --netns
(default when root) the child runs in a private network namespace (`unshare -n`) where loopback is
the only interface, because HAProxy mode binds its ports on all interfaces.
Every robot carries its memory token, sends an ~8 KB 224x224 JPEG and a 3-float state. The load
client shares the machine's cores with the server: the figures are for the whole box.
Wire format (`--wire`, docs/http_api.md): `json` (the frame as base64 in a JSON body), `binary` (the
binary form v1: the JPEG bytes as the body, the fields in the X-Act-Fields header) or `both` (every
proxy mode measured with each, JSON beside binary; rows and summary keys name the wire).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
INSTRUCTION = "go to the red box avoiding the barrel on the left"


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None, "mean_ms": None}
    arr = np.asarray(values)
    return {
        "p50_ms": round(float(np.percentile(arr, 50)), 2),
        "p95_ms": round(float(np.percentile(arr, 95)), 2),
        "p99_ms": round(float(np.percentile(arr, 99)), 2),
        "mean_ms": round(float(arr.mean()), 2),
    }


@contextlib.contextmanager
def local_serve_app(app, name: str, port: int, tokens_file: str):
    """A local Ray (4 logical CPUs, no dashboard) with Serve on 127.0.0.1:`port` running `app` at "/";
    yields the first token in `tokens_file`. Serve and Ray are shut down when the block ends (a
    complaint from Serve's shutdown about handles bound to a closed event loop is printed, not raised)."""
    import ray
    from ray import serve

    for attempt in range(3):  # Ray gives its raylet 30 s to register: a busy 2-core box can miss that
        try:
            ray.init(
                num_cpus=4,
                include_dashboard=False,
                _node_ip_address="127.0.0.1",
                log_to_driver=False,
                configure_logging=False,
            )
            break
        except Exception as exc:
            if "timed out during startup" not in str(exc) or attempt == 2:
                raise
            print(f"ray.init: {exc}; trying again", flush=True)
            ray.shutdown()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(app, name=name, route_prefix="/")
        yield Path(tokens_file).read_text().split()[0]
    finally:
        try:
            serve.shutdown()
        except Exception as exc:
            print(f"serve.shutdown: {type(exc).__name__}: {exc}", flush=True)
        finally:
            ray.shutdown()


def sample_jpeg(seed: int = 0) -> str:
    """A 224x224 frame with smooth shading and a few shapes, about 8 KB as JPEG (q 85)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:224, 0:224]
    base = np.stack([x * 0.6 + 40, y * 0.5 + 60, (x + y) * 0.3 + 30], axis=-1)
    base += rng.normal(0, 6, base.shape)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = rng.integers(0, 180, 2)
        draw.rectangle(
            [int(x0), int(y0), int(x0 + rng.integers(15, 45)), int(y0 + rng.integers(15, 45))],
            fill=tuple(int(v) for v in rng.integers(0, 255, 3)),
        )
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# -- in-process limit -----------------------------------------------------------------------------
def run_inprocess(model_dir: Path, batches: list[int], seconds: float) -> dict:
    from mobile_vla.runtime import load_backend

    backend = load_backend(model_dir, prefer=("onnx-cpu",))
    state_dim = backend.state_dim
    out = {"backend": backend.name, "batches": {}}
    for batch in batches:
        images = np.random.default_rng(0).integers(0, 255, (batch, 224, 224, 3), dtype=np.uint8)
        state = np.zeros((batch, state_dim), np.float32)
        memory = backend.initial_memory(batch)
        backend.predict(images, state, [INSTRUCTION] * batch, memory)  # warm-up
        times = []
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            t0 = time.perf_counter()
            result = backend.predict(images, state, [INSTRUCTION] * batch, memory)
            memory = result.memory
            times.append((time.perf_counter() - t0) * 1000)
        elapsed = time.perf_counter() - start
        out["batches"][str(batch)] = {"steps_per_s": round(len(times) * batch / elapsed, 1), **percentiles(times)}
        print(f"inprocess batch {batch}: {out['batches'][str(batch)]}", flush=True)
    out["max_steps_per_s"] = max(v["steps_per_s"] for v in out["batches"].values())
    return out


# -- HTTP load ------------------------------------------------------------------------------------
WIRES = ("json", "binary")


class Robot:
    """One simulated robot: its fields, its frame (base64 for JSON, the JPEG bytes for binary), its memory."""

    def __init__(self, robot_id: str, image: str, wire: str = "json"):
        self.body = {"robot_id": robot_id, "instruction": INSTRUCTION, "state": [0.1, 0.0, 0.0]}
        self.wire, self.image = wire, image if wire == "json" else base64.b64decode(image)
        self.memory: str | None = None

    def payload(self) -> tuple[bytes, dict[str, str]]:
        """(body, headers) of the robot's next /v1/act in its wire format."""
        body = dict(self.body)
        if self.memory:
            body["memory"] = self.memory
        if self.wire == "json":
            body["image"] = self.image
            return json.dumps(body).encode(), {"Content-Type": "application/json"}
        return self.image, {"Content-Type": "image/jpeg", "X-Act-Fields": json.dumps(body, separators=(",", ":"))}


async def _post(session, url: str, headers: dict, robot: Robot, record: dict, scheduled: float | None = None) -> None:
    t0 = scheduled if scheduled is not None else time.perf_counter()
    try:
        data, wire_headers = robot.payload()
        async with session.post(url, data=data, headers={**headers, **wire_headers}) as response:
            data = await response.read()
            if response.status != 200:
                record["errors"][str(response.status)] = record["errors"].get(str(response.status), 0) + 1
                return
            answer = json.loads(data)
            robot.memory = answer["memory"]
            record["backends"][answer["backend"]] = record["backends"].get(answer["backend"], 0) + 1
    except Exception as exc:  # connection reset, timeout: an error, counted, not fatal
        name = type(exc).__name__
        record["errors"][name] = record["errors"].get(name, 0) + 1
        return
    record["latencies"].append((time.perf_counter() - t0) * 1000)


def _new_record() -> dict:
    return {"latencies": [], "errors": {}, "backends": {}}


def _summary(record: dict, elapsed: float) -> dict:
    n_ok, n_err = len(record["latencies"]), sum(record["errors"].values())
    return {
        "requests": n_ok + n_err,
        "ok": n_ok,
        "errors": record["errors"],
        "error_rate": round(n_err / max(1, n_ok + n_err), 4),
        "throughput_rps": round(n_ok / elapsed, 1),
        **percentiles(record["latencies"]),
        "backend_mix": record["backends"],
    }


async def closed_loop(url: str, token: str, robots: int, seconds: float, image: str, wire: str = "json") -> dict:
    import aiohttp

    headers = {"Authorization": f"Bearer {token}"}
    record = _new_record()
    connector = aiohttp.TCPConnector(limit=robots + 8)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        fleet = [Robot(f"bench-{i}", image, wire) for i in range(robots)]
        for robot in fleet[: min(4, robots)]:  # warm the connection pool
            await _post(session, url, headers, robot, _new_record())
        stop = time.perf_counter() + seconds
        start = time.perf_counter()

        async def drive(robot: Robot):
            while time.perf_counter() < stop:
                await _post(session, url, headers, robot, record)

        await asyncio.gather(*(drive(r) for r in fleet))
        elapsed = time.perf_counter() - start
    return {"mode": "closed_loop", "wire": wire, "robots": robots, "seconds": seconds, **_summary(record, elapsed)}


async def open_loop(
    url: str, token: str, robots: int, hz: float, seconds: float, image: str, wire: str = "json"
) -> dict:
    import aiohttp

    headers = {"Authorization": f"Bearer {token}"}
    record = _new_record()
    period = 1.0 / hz
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=10)) as session:
        fleet = [Robot(f"bench-{i}", image, wire) for i in range(robots)]
        start = time.perf_counter() + 0.2
        tasks = []

        async def drive(index: int, robot: Robot):
            t = start + period * index / robots  # robots spread over one period
            while t < start + seconds:
                delay = t - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.ensure_future(_post(session, url, headers, robot, record, scheduled=t)))
                t += period

        await asyncio.gather(*(drive(i, r) for i, r in enumerate(fleet)))
        await asyncio.gather(*tasks)
        elapsed = seconds
    return {
        "mode": "open_loop",
        "wire": wire,
        "robots": robots,
        "hz": hz,
        "seconds": seconds,
        **_summary(record, elapsed),
    }


async def _measured_phase(phase: dict, url: str, token: str, image: str) -> tuple[dict, dict, dict]:
    """One load phase between two reads of the policy's batch counters. Handles are used inside an
    event loop: with RAY_SERVE_THROUGHPUT_OPTIMIZED=1 the router runs on the caller's loop."""
    from ray import serve

    policy = serve.get_deployment_handle("OnnxPolicy", app_name="bench")
    before = await policy.info.remote()
    if phase["kind"] == "closed":
        out = await closed_loop(url, token, phase["robots"], phase["seconds"], image, phase.get("wire", "json"))
    else:
        wire = phase.get("wire", "json")
        out = await open_loop(url, token, phase["robots"], phase["hz"], phase["seconds"], image, wire)
    return before, out, await policy.info.remote()


# Admission control of the app under test. "capacity" measures what the serving path can do: no step is
# shed or dropped for its deadline, so the closed loop's 64 robots queue instead (as before admission control
# existed, and comparable with the figures in docs/performance.md). "default" is the app's own defaults (a step's
# deadline is one control period, 2 x max_batch_size pending steps per ingress replica): goodput under shedding,
# with this benchmark's clients retrying at once rather than after Retry-After (benchmarks/serve_overload.py
# measures overload with clients that honour it).
ADMISSION = {
    "capacity": {"deadline_s": 60.0, "max_pending_requests": 4096, "policy_max_queued_requests": 4096},
    "default": {},
}


def serve_child(spec: dict) -> dict:
    """Runs in a fresh process: local Ray + the Serve app, then the load phases in `spec`."""
    from mobile_vla.serve.app import ServeAppConfig, build_app

    args = ServeAppConfig(
        model_uri=spec["model_uri"],
        tokens_file=spec["tokens_file"],
        max_batch_size=spec["max_batch_size"],
        batch_wait_timeout_s=spec["batch_wait_s"],
        max_ongoing_requests=max(64, spec["max_batch_size"]),
        primary_timeout_s=5.0,
        cpu_threads=spec.get("cpu_threads", 1),
        **ADMISSION[spec.get("admission", "capacity")],
    )
    with local_serve_app(build_app(args), "bench", spec["port"], spec["tokens_file"]) as token:
        url = f"http://127.0.0.1:{spec['port']}/v1/act"
        results = asyncio.run(_run_phases(spec, url, token, sample_jpeg()))
    return {"results": results}


async def _run_phases(spec: dict, url: str, token: str, image: str) -> list[dict]:
    """All phases on one event loop (handles stay bound to the loop that created them)."""
    results = []
    over_target = {}  # per wire
    for phase in spec["phases"]:
        if phase["kind"] == "open" and over_target.get(phase.get("wire", "json")):
            continue  # the sweep ascends: once p99 > 100 ms more robots will not meet it either
        before, out, after = await _measured_phase(phase, url, token, image)
        batches = after["batches"] - before["batches"]
        out["mean_batch_size"] = round((after["batched_requests"] - before["batched_requests"]) / max(1, batches), 2)
        out.update({k: spec[k] for k in ("label", "max_batch_size", "proxy")})
        print(json.dumps({k: v for k, v in out.items() if k != "backend_mix"}), flush=True)
        results.append(out)
        if phase["kind"] == "open" and (out["error_rate"] > 0 or out["p99_ms"] is None or out["p99_ms"] > 100):
            over_target[phase.get("wire", "json")] = True
    return results


PROXIES = ("default", "optimized", "haproxy")


def child_environment(proxy: str) -> dict[str, str]:
    """The environment of a benchmark's child process for one of `PROXIES` (see the module docstring)."""
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", RAY_USAGE_STATS_ENABLED="0")
    # as `mobile-vla serve` does: no load balancer in front to deregister a stopping replica, so Serve's
    # shutdown does not wait out a 30 s draining period in throughput mode
    env.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "0")
    env.pop("RAY_SERVE_THROUGHPUT_OPTIMIZED", None)
    env.pop("RAY_SERVE_ENABLE_HA_PROXY", None)
    if proxy == "optimized":
        env.update(RAY_SERVE_THROUGHPUT_OPTIMIZED="1")
    elif proxy == "haproxy":
        env.update(RAY_SERVE_ENABLE_HA_PROXY="1", RAY_SERVE_THROUGHPUT_OPTIMIZED="1")
    return env


def netns_available() -> bool:
    """Whether a child can run in a private network namespace (root and `unshare` here)."""
    return hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("unshare") is not None


def in_netns(command: list[str]) -> list[str]:
    """`command` inside a loopback-only network namespace: HAProxy's all-interface binds reach nothing else."""
    return ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *command]


def run_child(spec: dict, netns: bool, timeout_s: float = 900) -> list[dict]:
    env = child_environment(spec["proxy"])
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(spec, handle)
    out_path = handle.name + ".out"
    command = [sys.executable, __file__, "--child", handle.name, "--child-out", out_path]
    if netns:
        command = in_netns(command)
    try:
        subprocess.run(command, env=env, check=True, timeout=timeout_s)
        return json.loads(Path(out_path).read_text())["results"]
    except (subprocess.SubprocessError, OSError, ValueError) as exc:  # one failed mode must not lose the others
        print(f"{spec['label']}: failed: {exc}", flush=True)
        return [{"label": spec["label"], "proxy": spec["proxy"], "mode": "failed", "error": str(exc)}]


def prepare_model(preset: str, home: Path) -> tuple[str, str]:
    """A random-weight `preset` policy, registered as champion and exported, in a scratch home."""
    os.environ["MOBILE_VLA_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    from mobile_vla.serve.auth import create_tokens_file
    from mobile_vla.serve.sample_model import register_random_policy
    from mobile_vla.tracking import get_version_by_alias, get_version_tags

    version = get_version_by_alias("mobile-vla-policy", "champion") if (home / "mlflow.db").exists() else None
    if version is not None and get_version_tags("mobile-vla-policy", version).get("preset") == preset:
        uri = "models:/mobile-vla-policy@champion"  # --home reuse: already built and exported
    else:
        uri = register_random_policy(preset=preset)
    tokens = home / "tokens"
    if not tokens.exists():
        create_tokens_file(tokens)
    return uri, str(tokens)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", choices=["tiny", "small"])
    parser.add_argument("--seconds", type=float, default=15.0, help="per closed-loop phase")
    parser.add_argument("--robots", type=int, default=64, help="closed-loop concurrency")
    parser.add_argument("--hz", type=float, default=10.0)
    parser.add_argument("--sweep", default="10,20,30,40,50,64", help="open-loop robot counts")
    parser.add_argument("--proxies", default="default,optimized,haproxy")
    parser.add_argument("--batch-wait-s", type=float, default=0.005)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--cpu-threads", type=int, default=1, help="ONNX Runtime threads of the policy replica")
    parser.add_argument(
        "--admission",
        default="capacity",
        choices=sorted(ADMISSION),
        help="capacity: nothing shed or dropped for its deadline (the serving path's throughput); "
        "default: the app's own admission control (goodput under shedding)",
    )
    parser.add_argument(
        "--wire",
        default="json",
        choices=[*WIRES, "both"],
        help="how /v1/act bodies go: json (base64 frame), binary (JPEG bytes + X-Act-Fields), both (side by side)",
    )
    parser.add_argument("--quick", action="store_true", help="short phases (a smoke run)")
    parser.add_argument("--no-netns", action="store_true")
    parser.add_argument("--out", default=str(RESULTS / "serve_load.json"))
    parser.add_argument("--home", default=None, help="platform home to keep (and reuse) the exported model in")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = serve_child(json.loads(Path(args.child).read_text()))
        Path(args.child_out).write_text(json.dumps(result))
        return 0
    if args.quick:
        args.seconds, args.sweep = 4.0, "8,16"
    netns = not args.no_netns and netns_available()
    home = Path(args.home).resolve() if args.home else Path(tempfile.mkdtemp(prefix="serve-bench-"))
    home.mkdir(parents=True, exist_ok=True)
    model_uri, tokens_file = prepare_model(args.preset, home)
    from mobile_vla.tracking import resolve_model

    report = {
        "benchmark": "serve_load",
        "preset": args.preset,
        "machine": f"{os.cpu_count()}-core {platform.machine()} CPU box",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "netns": netns,
        "settings": vars(args).copy(),
    }
    report["inprocess"] = run_inprocess(resolve_model(model_uri).path, [1, 8, 32, 64], min(args.seconds, 8.0))
    sweep = [int(v) for v in args.sweep.split(",") if v]
    wires = WIRES if args.wire == "both" else (args.wire,)
    report["http"] = []
    for index, proxy in enumerate(p for p in args.proxies.split(",") if p):
        base = {
            "model_uri": model_uri,
            "tokens_file": tokens_file,
            "proxy": proxy,
            "port": 8000 + 10 * index + 100,
            "batch_wait_s": args.batch_wait_s,
            "cpu_threads": args.cpu_threads,
            "admission": args.admission,
        }
        phases, closed = [], []
        for wire in wires:  # in one child per batching mode: the same app serves both wires
            closed.append({"kind": "closed", "robots": args.robots, "seconds": args.seconds, "wire": wire})
            phases.append(closed[-1])
            open_s = max(args.seconds * 2 / 3, 4.0)
            phases += [{"kind": "open", "robots": n, "hz": args.hz, "seconds": open_s, "wire": wire} for n in sweep]
        report["http"] += run_child(
            {**base, "label": f"{proxy}-batched", "max_batch_size": args.max_batch_size, "phases": phases}, netns
        )
        report["http"] += run_child(
            {**base, "label": f"{proxy}-unbatched", "max_batch_size": 1, "phases": closed},
            netns,
        )
    limit = report["inprocess"]["max_steps_per_s"]
    summary = {"inprocess_max_steps_per_s": limit}
    for proxy, wire in ((p, w) for p in args.proxies.split(",") for w in wires):
        mine = [r for r in report["http"] if r["proxy"] == proxy and r["wire"] == wire]
        rows = {r["label"]: r for r in mine if r["mode"] == "closed_loop"}
        batched, unbatched = rows.get(f"{proxy}-batched"), rows.get(f"{proxy}-unbatched")
        ok = [
            r["robots"]
            for r in mine
            if r["mode"] == "open_loop" and r["error_rate"] == 0 and r["p99_ms"] is not None and r["p99_ms"] <= 100
        ]
        if batched and unbatched:
            summary[proxy if wire == "json" else f"{proxy}/{wire}"] = {  # JSON keeps the keys of earlier results
                "batched_rps": batched["throughput_rps"],
                "batched_p50_ms": batched["p50_ms"],
                "batched_p99_ms": batched["p99_ms"],
                "batched_mean_batch": batched["mean_batch_size"],
                "unbatched_rps": unbatched["throughput_rps"],
                "unbatched_p50_ms": unbatched["p50_ms"],
                "unbatched_p99_ms": unbatched["p99_ms"],
                "batching_speedup": round(batched["throughput_rps"] / max(1e-9, unbatched["throughput_rps"]), 2),
                "fraction_of_inprocess": round(batched["throughput_rps"] / max(1e-9, limit), 3),
                f"robots_at_{args.hz:g}hz_p99_le_100ms": max(ok) if ok else 0,
            }
    report["summary"] = summary
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(summary, indent=2))
    print(f"wrote {out}")
    if not args.home:
        shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
