"""Overload benchmark (issue 16): the real Serve app offered 10x its capacity, open loop.

    .venv/bin/python benchmarks/serve_overload.py                  # `small` preset, 60 s of overload
    .venv/bin/python benchmarks/serve_overload.py --preset tiny --quick   # a ~20 s smoke run

Phases, in one fresh local Ray (a child process, like serve_load.py):
  capacity   closed loop, `--robots` robots each sending its next step when the answer arrives:
             the answered requests/s are the capacity C.
  unloaded   open loop at `--calm-share` x C: the unloaded p50/p99.
  overload   open loop at `--factor` x C (robots at `--hz` each, on schedule whether or not answers
             came): the admitted (200) requests' p99 against the unloaded one, the share of 429s
             and how many carried Retry-After, other statuses, the RSS of the Serve replicas
             (sampled every second), the primary breaker's state during and after.
  recovery   the unloaded rate again right after: seconds until a one-second window is all 200s
             with p99 <= 2 x the unloaded p99.
Latency counts from each request's scheduled time (queueing in the load client shows too) and,
separately, from when it was actually sent. The load client shares the machine's cores with the
server: on the 2-core box it cannot offer much more than the server's capacity x a few, and the
JSON says what it did offer (`sent_rps`). Results: benchmarks/results/serve_overload.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

from serve_load import INSTRUCTION, local_serve_app, percentiles, prepare_model, sample_jpeg

RESULTS = Path(__file__).resolve().parent / "results"
APP = "overload"


class Recorder:
    """Every answer's status, Retry-After and latencies (from the schedule and from the send)."""

    def __init__(self):
        self.rows: list[tuple[float, int, bool, float, float]] = []  # (done_at, status, retry_after, sched_ms, sent_ms)

    def add(self, status: int, retry_after: bool, scheduled: float, sent: float) -> None:
        now = time.perf_counter()
        self.rows.append((now, status, retry_after, (now - scheduled) * 1000, (now - sent) * 1000))

    def summary(self, seconds: float) -> dict:
        statuses: dict[str, int] = {}
        for _, status, _, _, _ in self.rows:
            statuses[str(status)] = statuses.get(str(status), 0) + 1
        admitted = [r for r in self.rows if r[1] == 200]
        shed = [r for r in self.rows if r[1] == 429]
        total = max(1, len(self.rows))
        return {
            "requests": len(self.rows),
            "sent_rps": round(len(self.rows) / seconds, 1),
            "answered_rps": round(len(admitted) / seconds, 1),
            "statuses": statuses,
            "share_429": round(len(shed) / total, 4),
            "share_429_with_retry_after": round(sum(r[2] for r in shed) / max(1, len(shed)), 4),
            "share_5xx": round(sum(1 for r in self.rows if r[1] >= 500) / total, 4),
            "admitted_from_schedule": percentiles([r[3] for r in admitted]),
            "admitted_from_send": percentiles([r[4] for r in admitted]),
        }


async def _post(session, url: str, headers: dict, body: bytes, recorder: Recorder, scheduled: float) -> None:
    sent = time.perf_counter()
    try:
        async with session.post(url, data=body, headers=headers) as response:
            await response.read()
            recorder.add(response.status, "retry-after" in response.headers, scheduled, sent)
    except Exception:  # connection refused/reset, client timeout: status 0
        recorder.add(0, False, scheduled, sent)


def _body(robot: int, image: str) -> bytes:
    return json.dumps(
        {"robot_id": f"load-{robot}", "instruction": INSTRUCTION, "image": image, "state": [0.1, 0.0, 0.0]}
    ).encode()


async def closed_loop(session, url: str, headers: dict, robots: int, seconds: float, image: str) -> dict:
    recorder = Recorder()
    stop = time.perf_counter() + seconds

    async def drive(robot: int):
        while time.perf_counter() < stop:
            await _post(session, url, headers, _body(robot, image), recorder, time.perf_counter())

    await asyncio.gather(*(drive(r) for r in range(robots)))
    return recorder.summary(seconds)


async def open_loop(session, url: str, headers: dict, rate: float, seconds: float, image: str, hz: float) -> Recorder:
    """`rate` requests/s for `seconds`, as rate / hz robots at `hz` each, on schedule."""
    recorder, tasks = Recorder(), []
    robots = max(1, round(rate / hz))
    bodies = [_body(r, image) for r in range(robots)]
    interval = 1.0 / (robots * hz)
    start = time.perf_counter() + 0.05
    n = 0
    while True:
        scheduled = start + n * interval
        if scheduled >= start + seconds:
            break
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(_post(session, url, headers, bodies[n % robots], recorder, scheduled)))
        n += 1
    await asyncio.gather(*tasks)
    return recorder


def replica_rss_mb() -> float:
    """Resident memory of the Serve replica processes (ingress + policy), MB."""
    total = 0
    for proc in psutil.process_iter(["cmdline", "memory_info"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "ServeReplica" in cmdline and proc.info["memory_info"] is not None:
            total += proc.info["memory_info"].rss
    return round(total / 2**20, 1)


async def sample_rss(samples: list, stop: asyncio.Event) -> None:
    while not stop.is_set():
        samples.append(replica_rss_mb())
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
        except TimeoutError:
            pass


async def breaker(session, base: str, headers: dict) -> str | None:
    try:
        async with session.get(f"{base}/v1/model", headers=headers) as response:
            if response.status != 200:  # e.g. Serve's own 429 (plain text) while the proxy sheds
                return f"not read (HTTP {response.status})"
            info = json.loads(await response.read())
        return next(b["breaker"] for b in info["backends"] if b["role"] == "primary")
    except Exception as exc:
        return f"unknown ({type(exc).__name__})"


async def recovery(session, url: str, headers: dict, rate: float, hz: float, image: str, limit_ms: float, max_s: float):
    """Seconds after the overload until a one-second window is all 200s with p99 <= limit_ms."""
    start = time.perf_counter()
    while time.perf_counter() - start < max_s:
        window = await open_loop(session, url, headers, rate, 1.0, image, hz)
        latencies = [r[3] for r in window.rows if r[1] == 200]
        if latencies and len(latencies) == len(window.rows) and float(np.percentile(latencies, 99)) <= limit_ms:
            return round(time.perf_counter() - start, 2)
    return None


async def run_phases(spec: dict, base: str, token: str) -> dict:
    import aiohttp

    image = sample_jpeg()
    url = f"{base}/v1/act"
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=30)
    out: dict = {}
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await closed_loop(session, url, headers, 4, 2.0, image)  # warm-up
        out["capacity"] = await closed_loop(session, url, headers, spec["robots"], spec["capacity_s"], image)
        capacity = max(1.0, out["capacity"]["answered_rps"])
        calm = await open_loop(session, url, headers, spec["calm_share"] * capacity, spec["calm_s"], image, spec["hz"])
        out["unloaded"] = {"rate_rps": round(spec["calm_share"] * capacity, 1), **calm.summary(spec["calm_s"])}
        unloaded_p99 = out["unloaded"]["admitted_from_schedule"]["p99_ms"] or 1.0
        rss, stop = [replica_rss_mb()], asyncio.Event()
        sampler = asyncio.ensure_future(sample_rss(rss, stop))
        offered = spec["factor"] * capacity
        overload_task = asyncio.ensure_future(
            open_loop(session, url, headers, offered, spec["overload_s"], image, spec["hz"])
        )
        await asyncio.sleep(spec["overload_s"] / 2)
        breaker_during = await breaker(session, base, headers)
        loaded = await overload_task
        stop.set()
        await sampler
        out["overload"] = {
            "offered_rps": round(offered, 1),
            "robots": max(1, round(offered / spec["hz"])),
            **loaded.summary(spec["overload_s"]),
            "breaker_mid_run": breaker_during,
            "rss_mb": {"before": rss[0], "max": max(rss), "last": rss[-1], "samples": len(rss)},
        }
        admitted_p99 = out["overload"]["admitted_from_schedule"]["p99_ms"]
        out["overload"]["admitted_p99_over_unloaded_p99"] = (
            round(admitted_p99 / unloaded_p99, 2) if admitted_p99 is not None else None
        )
        out["recovery_s"] = await recovery(
            session,
            url,
            headers,
            spec["calm_share"] * capacity,
            spec["hz"],
            image,
            2 * unloaded_p99,
            spec["recovery_s"],
        )
        out["breaker_after"] = await breaker(session, base, headers)
    return out


def serve_child(spec: dict) -> dict:
    """Runs in a fresh process: local Ray + the Serve app (fallback included), then the phases."""
    from mobile_vla.serve.app import ServeAppConfig, build_app

    args = ServeAppConfig(
        model_uri=spec["model_uri"],
        tokens_file=spec["tokens_file"],
        fallback="onnx",
        max_batch_size=spec["max_batch_size"],
        **spec["app_args"],
    )
    with local_serve_app(build_app(args), APP, spec["port"], spec["tokens_file"]) as token:
        return asyncio.run(run_phases(spec, f"http://127.0.0.1:{spec['port']}", token))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", choices=["tiny", "small"])
    parser.add_argument("--robots", type=int, default=32, help="closed-loop concurrency of the capacity phase")
    parser.add_argument("--hz", type=float, default=10.0, help="each robot's control rate")
    parser.add_argument("--factor", type=float, default=10.0, help="overload = factor x capacity")
    parser.add_argument("--calm-share", type=float, default=0.3, help="unloaded rate = share x capacity")
    parser.add_argument("--overload-s", type=float, default=60.0)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument(
        "--app-args", default="{}", help='extra ServeAppConfig fields as JSON, e.g. {"deadline_s": 0.2}'
    )
    parser.add_argument("--quick", action="store_true", help="a ~20 s smoke run of the load phases")
    parser.add_argument("--home", default=None, help="platform home to keep (and reuse) the exported model in")
    parser.add_argument("--out", default=str(RESULTS / "serve_overload.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        Path(args.child_out).write_text(json.dumps(serve_child(json.loads(Path(args.child).read_text()))))
        return 0
    home = Path(args.home or tempfile.mkdtemp(prefix="mobile-vla-overload-"))
    home.mkdir(parents=True, exist_ok=True)
    model_uri, tokens_file = prepare_model(args.preset, home)
    quick = args.quick
    spec = {
        "port": 8000 + os.getpid() % 1000,
        "model_uri": model_uri,
        "tokens_file": tokens_file,
        "max_batch_size": args.max_batch_size,
        "app_args": json.loads(args.app_args),
        "robots": args.robots,
        "hz": args.hz,
        "factor": args.factor,
        "calm_share": args.calm_share,
        "capacity_s": 3.0 if quick else 15.0,
        "calm_s": 3.0 if quick else 15.0,
        "overload_s": 8.0 if quick else args.overload_s,
        "recovery_s": 6.0 if quick else 30.0,
    }
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(spec, handle)
    out_path = handle.name + ".out"
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", RAY_USAGE_STATS_ENABLED="0")
    subprocess.run([sys.executable, __file__, "--child", handle.name, "--child-out", out_path], env=env, check=True)
    result = {
        "benchmark": "serve_overload",
        "preset": args.preset,
        "quick": quick,
        "host": {
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "note": "loaded box: shared with training runs",
        },
        "spec": {k: v for k, v in spec.items() if k not in ("tokens_file", "port")},
        **json.loads(Path(out_path).read_text()),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
