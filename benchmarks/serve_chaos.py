"""Chaos check of the Serve app (issue 16): kill -9 one replica at a time under a 10-robot 10 Hz load.

    .venv/bin/python benchmarks/serve_chaos.py                      # 30 s per phase, tiny preset
    .venv/bin/python benchmarks/serve_chaos.py --seconds 8          # a short run

The real app (ONNX Runtime primary `OnnxPolicy` + an ONNX fallback deployment `OnnxFallbackPolicy`,
ingress `PolicyIngress`) on a local Ray, HTTP on 127.0.0.1 only. Robots are `mobile_vla_client.Client`s
(the fleet's own client: retries on 429/502/503 and connection errors inside one call deadline, the
remaining budget sent as `deadline_ms`), each stepping at `hz` on its own schedule.

Phases, each `seconds` of load: `calm` (no fault), then `ingress`, `primary`, `fallback`: a kill -9
(SIGKILL to the replica's worker process) a fifth into the phase, the load running on; the next phase
starts only once the killed deployment has a new live replica that answers. A replica's PID comes
from the GCS actor table (`ray._private.state.actors`, class name `ServeReplica:<app>:<deployment>`):
Ray's state API (`ray.util.state.list_actors`) needs the dashboard, which the platform starts without.

Cross-talk check: every robot has its own instruction, state and frame, and its expected action chunk
is computed beforehand in-process with the same ONNX Runtime backend and the model's saved image
preprocessing. Each answer must (a) carry a memory token whose robot_id (HMAC-signed by the server)
is the robot's own and (b) match the robot's own expected actions within `ACTION_ATOL`, nearer to them
than to any other robot's (the chunks are at least `MIN_EXPECTED_GAP` apart, checked); every step
starts a fresh episode (no memory sent), so the expected answer is the same for every step.

Failed request: any call that did not end in a 200 within its deadline (after the client's retries).
Writes benchmarks/results/serve_chaos.json. The box's cores are shared with the load client (and,
in this project, with other work): the figures are for the whole, loaded box.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from mobile_vla_client import Client, ClientError, encode_jpeg

RESULTS = Path(__file__).resolve().parent / "results"
WARMUP_TIMEOUT_S = 60.0  # every robot answered once before the calm phase starts
ACTION_ATOL = 1e-3  # an answer off its robot's own chunk by more is wrong (batched vs single rows: ~1e-6 apart)
MIN_EXPECTED_GAP = 1e-4  # robots' chunks at least this far apart (100x the batching noise): a swap is visible
INGRESS, PRIMARY, FALLBACK = "PolicyIngress", "OnnxPolicy", "OnnxFallbackPolicy"
TARGETS = (("ingress", INGRESS), ("primary", PRIMARY), ("fallback", FALLBACK))
INSTRUCTIONS = (
    "go to the red box",
    "go to the blue ball",
    "go to the green key",
    "go to the yellow barrel",
    "go to the purple box",
    "go to the red ball avoiding the barrel",
    "go to the blue box on the left",
    "go to the green ball on the right",
    "go to the yellow key near the wall",
    "go to the purple ball behind the box",
    "go to the grey box",
    "go to the red key",
)


@dataclass
class ChaosRobot:
    """One robot's fixed input and the answer it must get."""

    robot_id: str
    instruction: str
    state: list[float]
    frame: np.ndarray  # uint8 [224, 224, 3]
    expected: np.ndarray  # float32 [K, 3]: the in-process answer for a fresh memory


def _frame(seed: int) -> np.ndarray:
    """A distinct smooth frame (plus shapes) per seed: uint8 [224, 224, 3]."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:224, 0:224]
    tint = rng.uniform(0.2, 1.0, 3)
    base = np.stack([x * tint[0], y * tint[1], (x + y) * tint[2] * 0.5], axis=-1) + rng.uniform(0, 80)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(5):
        x0, y0 = (int(v) for v in rng.integers(0, 180, 2))
        size = int(rng.integers(15, 45))
        draw.rectangle([x0, y0, x0 + size, y0 + size], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    return np.asarray(image)


def make_fleet(model_uri: str, robots: int) -> list[ChaosRobot]:
    """`robots` robots with distinct inputs, and each one's expected action chunk (ONNX Runtime CPU,
    the JPEG the client sends decoded and resized as the ingress does).

    Raises:
        ValueError: two robots' expected chunks closer than MIN_EXPECTED_GAP (the check could not tell them apart).
    """
    from PIL import Image

    from mobile_vla.runtime import load_backend
    from mobile_vla.serve.model_side import load_model_side
    from mobile_vla.tracking import resolve_model

    if not 1 <= robots <= len(INSTRUCTIONS):
        raise ValueError(f"robots = {robots}: between 1 and {len(INSTRUCTIONS)}")
    side = load_model_side(model_uri)
    backend = load_backend(resolve_model(model_uri).path, prefer=("onnx-cpu",))
    rng = np.random.default_rng(16)
    fleet = []
    for i in range(robots):
        frame = _frame(100 + i)
        sent = Image.open(io.BytesIO(encode_jpeg(frame)))
        image = side.prepare_image(sent.convert("RGB"))  # [224, 224, 3] what the policy replica gets
        state = [float(v) for v in rng.uniform(-0.4, 0.4, side.state_dim).round(3)]
        out = backend.predict(
            image[None], np.asarray([state], np.float32), [INSTRUCTIONS[i]], backend.initial_memory(1)
        )
        expected = np.asarray(out.actions, np.float32)[0]  # [K, 3]
        fleet.append(ChaosRobot(f"chaos-{i}", INSTRUCTIONS[i], state, frame, expected))
    gap = min_pairwise_gap(fleet)
    if gap < MIN_EXPECTED_GAP:
        raise ValueError(f"two robots' expected chunks differ by only {gap:.2e}: the cross-talk check is blind")
    return fleet


def min_pairwise_gap(fleet: list[ChaosRobot]) -> float:
    """The smallest max-abs difference between two robots' expected chunks."""
    gaps = [float(np.abs(a.expected - b.expected).max()) for i, a in enumerate(fleet) for b in fleet[i + 1 :]]
    return min(gaps) if gaps else float("inf")


def replica_pids(app_name: str, deployment: str) -> list[int]:
    """PIDs of the deployment's ALIVE replicas in the GCS actor table (a killed one may linger a moment)."""
    from ray._private import state

    wanted = f"ServeReplica:{app_name}:{deployment}"
    return [
        int(a["Pid"])
        for a in state.actors(actor_state_name="ALIVE").values()
        if a["ActorClassName"] == wanted and a["Pid"]
    ]


@dataclass
class Outcome:
    """One robot call."""

    phase: str
    robot_id: str
    sent_at: float  # time.monotonic()
    ok: bool
    error: str = ""  # status/code of a failed call
    mismatch: str = ""  # why an answered call is not this robot's answer
    action_error: float = 0.0  # max |answer - own expected chunk| of an answered call


@dataclass
class FleetLoad:
    """`robots` threads, each stepping at `hz` with its own Client until `stop()`."""

    url: str
    token: str
    fleet: list[ChaosRobot]
    codec: object  # MemoryCodec of the app's secret: reads the robot_id the server signed into each answer
    hz: float = 10.0
    deadline_s: float = 1.0
    phase: str = "warmup"
    outcomes: list[Outcome] = field(default_factory=list)

    def __post_init__(self):
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._drive, args=(r, i), daemon=True) for i, r in enumerate(self.fleet)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self.deadline_s + 5)

    def _drive(self, robot: ChaosRobot, index: int) -> None:
        period = 1.0 / self.hz
        with Client(
            self.url, self.token, robot.robot_id, timeout_s=self.deadline_s, retries=2, send_deadline=True
        ) as client:
            next_at = time.monotonic() + period * index / len(self.fleet)  # robots spread over one period
            while not self._stop.is_set():
                delay = next_at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                phase, sent_at = self.phase, time.monotonic()
                client.start_episode(robot.instruction)  # no memory sent: the expected answer stays fixed
                try:
                    answer = client.act(robot.frame, robot.state)
                except ClientError as exc:  # refused (status, code) or no answer within the deadline
                    outcome = Outcome(phase, robot.robot_id, sent_at, False, error=f"{exc.status} {exc.code}")
                except Exception as exc:  # anything else the client lets through: a failed call, counted
                    outcome = Outcome(phase, robot.robot_id, sent_at, False, error=type(exc).__name__)
                else:
                    mismatch, error = self._check(robot, answer)
                    outcome = Outcome(phase, robot.robot_id, sent_at, True, mismatch=mismatch, action_error=error)
                with self._lock:
                    self.outcomes.append(outcome)
                next_at = max(next_at + period, time.monotonic())  # a late answer delays, never bunches, the next step

    def _check(self, robot: ChaosRobot, answer) -> tuple[str, float]:
        """('', error) when the answer is this robot's: signed for its robot_id, its actions within ACTION_ATOL of
        its own expected chunk and nearer to it than to any other robot's."""
        signed_for = self.codec.decode(answer.raw["memory"]).robot_id
        if signed_for != robot.robot_id:
            return f"memory token for {signed_for}", float("inf")
        actions = np.asarray(answer.actions, np.float32)  # [K, 3]
        error = float(np.abs(actions - robot.expected).max())
        closest = min(self.fleet, key=lambda r: float(np.abs(actions - r.expected).max()))
        if error > ACTION_ATOL or closest is not robot:
            return f"actions off by {error:.2e} (closest: {closest.robot_id})", error
        return "", error


def phase_summary(outcomes: list[Outcome], phase: str, scheduled: float) -> dict:
    """Counts, failed share, mismatches and the longest stretch any robot went unanswered in `phase`.

    `scheduled`: the steps the robots' schedules held in the phase (robots * hz * its seconds); calls
    that wait out a deadline delay the next step, so answered / scheduled shows control steps lost too.
    """
    rows = [o for o in outcomes if o.phase == phase]
    failed = [o for o in rows if not o.ok]
    errors: dict[str, int] = {}
    for o in failed:
        errors[o.error] = errors.get(o.error, 0) + 1
    longest_gap = 0.0
    for robot_id in {o.robot_id for o in rows}:
        times = sorted(o.sent_at for o in rows if o.robot_id == robot_id and o.ok)
        if len(times) > 1:
            longest_gap = max(longest_gap, float(np.diff(times).max()))
    return {
        "requests": len(rows),
        "failed": len(failed),
        "failed_share": round(len(failed) / max(1, len(rows)), 5),
        "errors": errors,
        "scheduled_steps": int(scheduled),
        "answered_share_of_schedule": round(sum(1 for o in rows if o.ok) / max(1.0, scheduled), 4),
        "mismatches": sum(1 for o in rows if o.mismatch),
        "mismatch_examples": [f"{o.robot_id}: {o.mismatch}" for o in rows if o.mismatch][:5],
        "longest_unanswered_s": round(longest_gap, 2),
    }


def _answering(deployment: str, app_name: str, url: str) -> bool:
    """Whether the deployment's (new) replica serves: the ingress answers /healthz, a policy says loaded."""
    from ray import serve

    try:
        if deployment == INGRESS:
            return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
        info = serve.get_deployment_handle(deployment, app_name=app_name).info.remote().result(timeout_s=5)
        return bool(info.get("loaded"))
    except Exception:  # the old replica gone, the new one not up yet
        return False


def kill_and_recover(app_name: str, deployment: str, url: str, timeout_s: float = 300) -> dict:
    """SIGKILL the deployment's replica process; wait for a new live PID that answers.

    Returns:
        {"deployment", "killed_pid", "new_pid", "recovery_s", "killed_at", "recovered_at"}: recovery_s
        from the kill to the new replica answering; the two instants on time.monotonic().
    """
    pids = replica_pids(app_name, deployment)
    if len(pids) != 1:
        raise RuntimeError(f"{deployment}: live replica PIDs {pids}; the check kills the only one")
    old = pids[0]
    os.kill(old, signal.SIGKILL)
    killed_at = time.monotonic()
    while time.monotonic() - killed_at < timeout_s:
        pids = replica_pids(app_name, deployment)
        new = pids[0] if len(pids) == 1 and pids[0] != old else None
        if new is not None and _answering(deployment, app_name, url):
            recovered_at = time.monotonic()
            return {
                "deployment": deployment,
                "killed_pid": old,
                "new_pid": new,
                "recovery_s": round(recovered_at - killed_at, 2),
                "killed_at": killed_at,  # time.monotonic(), as Outcome.sent_at
                "recovered_at": recovered_at,
            }
        time.sleep(0.2)
    raise RuntimeError(f"{deployment}: no new replica answering {timeout_s} s after the kill of PID {old}")


def breaker_closed(url: str, token: str) -> bool:
    """Whether /v1/model (operator view) shows the primary's breaker closed: traffic back on the primary."""
    try:
        response = httpx.get(f"{url}/v1/model", headers={"Authorization": f"Bearer {token}"}, timeout=2)
        backends = response.json()["backends"] if response.status_code == 200 else []
    except (httpx.HTTPError, ValueError, KeyError):
        return False
    return any(b["role"] == "primary" and b.get("breaker") == "closed" for b in backends)


def wait_breaker_closed(url: str, token: str, timeout_s: float = 120) -> float:
    """Seconds until the primary's breaker is closed (the app back to its steady state)."""
    start = time.monotonic()
    while not breaker_closed(url, token):
        if time.monotonic() - start > timeout_s:
            raise RuntimeError(f"the primary's breaker still not closed after {timeout_s} s")
        time.sleep(0.2)
    return round(time.monotonic() - start, 2)


def wait_until_every_robot_answered(load: FleetLoad, timeout_s: float) -> None:
    """Warm-up: until every robot had an answer and then one more second (connections up, each replica's
    first batches through), so that `calm` starts from the steady state and not from a cold app (a fixed
    two-second wait let a slow start count as calm-phase failures).

    Raises:
        RuntimeError: some robot got no answer within `timeout_s`.
    """
    robots = {robot.robot_id for robot in load.fleet}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with load._lock:
            answered = {o.robot_id for o in load.outcomes if o.ok}
        if robots <= answered:
            time.sleep(1.0)
            return
        time.sleep(0.2)
    raise RuntimeError(f"warm-up: {sorted(robots - answered)} got no answer within {timeout_s:.0f} s")


def run_chaos(load: FleetLoad, app_name: str, url: str, seconds: float, targets=TARGETS) -> dict:
    """`calm`, then one phase per target: kill a fifth into the phase, the phase lasting at least
    `seconds` and until the replica recovered and the primary's breaker closed again (so each kill
    starts from the steady state). Returns the phases' summaries, the kills and the overall figures."""
    load.start()
    wait_until_every_robot_answered(load, WARMUP_TIMEOUT_S)  # the warmup outcomes are not counted
    kills, seconds_in = [], {}
    try:
        for name, deployment in (("calm", None), *targets):
            load.phase = name
            started = time.monotonic()
            if deployment is not None:
                time.sleep(seconds / 5)
                kill = kill_and_recover(app_name, deployment, url)
                kills.append({"phase": name, **kill})
                print(json.dumps(kills[-1]), flush=True)
            time.sleep(max(0.0, started + seconds - time.monotonic()))
            if deployment is not None:  # the next kill starts from the steady state: primary serving
                kills[-1]["breaker_closed_after_phase_s"] = wait_breaker_closed(url, load.token)
            seconds_in[name] = time.monotonic() - started
    finally:
        load.phase = "done"
        load.stop()
    steps_per_s = len(load.fleet) * load.hz
    phases = {name: phase_summary(load.outcomes, name, steps_per_s * s) for name, s in seconds_in.items()}
    chaos = [o for o in load.outcomes if o.phase in {name for name, _ in targets}]
    failed = sum(1 for o in chaos if not o.ok)
    return {
        "phases": phases,
        "kills": kills,
        "chaos_requests": len(chaos),
        "chaos_failed": failed,
        "chaos_failed_share": round(failed / max(1, len(chaos)), 5),
        "mismatches": sum(1 for o in load.outcomes if o.ok and o.mismatch),
        "max_own_error": max((o.action_error for o in load.outcomes if o.ok), default=None),
    }


def app_args(tokens_file: str):
    """The app under test: ONNX primary + ONNX fallback, the shipped defaults otherwise, but the safety ladder
    off: it scales the answers of novel frames (these synthetic ones are), and the cross-talk check compares
    each answer with the robot's raw chunk (tests/serve/test_safety_http.py covers the ladder)."""
    from mobile_vla.serve.app import ServeAppConfig

    return ServeAppConfig(
        tokens_file=tokens_file,
        fallback="onnx",
        max_batch_size=16,
        batch_wait_timeout_s=0.01,
        safety={"enabled": False},
    )


def main() -> int:
    from serve_load import local_serve_app, prepare_model  # the sibling benchmark's helpers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="load per phase")
    parser.add_argument("--robots", type=int, default=10)
    parser.add_argument("--hz", type=float, default=10.0)
    parser.add_argument("--deadline-s", type=float, default=1.0, help="each robot call's total deadline")
    parser.add_argument("--port", type=int, default=8290, help="Serve HTTP port on 127.0.0.1")
    parser.add_argument("--out", default=str(RESULTS / "serve_chaos.json"))
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="serve-chaos-"))
    model_uri, tokens_file = prepare_model("tiny", home)
    fleet = make_fleet(model_uri, args.robots)

    from mobile_vla.serve.app import compose_app
    from mobile_vla.serve.memory_token import MemoryCodec, default_secret_path

    app_name, url = "chaos", f"http://127.0.0.1:{args.port}"
    with local_serve_app(compose_app(app_args(tokens_file)), app_name, args.port, tokens_file) as token:
        codec = MemoryCodec.from_file(default_secret_path())  # the app made it under this home
        load = FleetLoad(url, token, fleet, codec, hz=args.hz, deadline_s=args.deadline_s)
        result = run_chaos(load, app_name, url, args.seconds)
    report = {
        "benchmark": "serve_chaos",
        "preset": "tiny",
        "machine": f"{os.cpu_count()}-core {platform.machine()} CPU box, loaded (shared with other work)",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "settings": vars(args),
        "app": app_args(tokens_file).model_dump(exclude={"tokens_file"}),
        "min_expected_gap": float(f"{min_pairwise_gap(fleet):.3e}"),
        "action_atol": ACTION_ATOL,
        "goal_failed_share": 0.005,
        **result,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("phases", "kills", "chaos_failed_share", "mismatches")}, indent=2))
    print(f"wrote {out}")
    shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
