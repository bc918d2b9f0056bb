"""Tokens bound to robots and scopes, revocation and memory-key rotation, and the feedback log's disk
filling up, against the real Serve app (tiny exported model, ONNX Runtime CPU primary, two ingress
replicas as a fleet runs them) with its own tokens and memory-key files.

Which ingress replica answered a request is read from Serve's own per-replica logs
(`logs/serve/replica_<app>_PolicyIngress_<replica id>.log`): every line a replica logs while it
handles a request carries the request id the proxy also returns as `X-Request-ID`.

The full disk is a real one: the feedback folder lives on a 1 MiB tmpfs mounted for this module, and
the test fills it with a ballast file until the kernel answers ENOSPC, then deletes the ballast. No
fault is injected and no test-only code path runs in the replicas: the ingress meets the ENOSPC (and,
in an open segment's last page, the partial write) a full volume gives in production, through the
app argument `feedback_dir` it already has. Cheaper than an injected fault, which would need a
test-only hook inside the ingress replica process. Mounting needs CAP_SYS_ADMIN (root, as on the
project's 2-core box); without it that one test is skipped and the store-level tests
(tests/online/test_feedback_durability.py: injected ENOSPC, a tmpfs in a user namespace) still cover
the log. A private mount namespace (`unshare -rm`) would not do here: the replicas are Ray workers
outside it.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import io
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mobile_vla.cli import main
from mobile_vla.online.feedback_store import FeedbackStore
from mobile_vla.serve.auth import add_token
from tests.serve.conftest import deployed_app

pytestmark = pytest.mark.slow  # deploys its own app: about a minute on 2 cores

APP = "mobile-vla-identity"
INGRESS_REPLICAS = 2
REVOCATION_LIMIT_S = 10.0  # issue 16: every replica answers 401 within 10 s of the edit
REPLICA_START_LIMIT_S = 180.0  # a killed ingress replica replaced by Serve (about 6 s on a quiet box)


def _image() -> str:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return base64.b64encode(buffer.getvalue()).decode()


IMAGE = _image()


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str = "1m"):
    """A real tmpfs of `size` mounted at `path` for the block (yields None where this process may not
    mount one: it needs CAP_SYS_ADMIN), unmounted afterwards.
    """
    path.mkdir(parents=True, exist_ok=True)
    mount, umount = shutil.which("mount"), shutil.which("umount")
    mounted = (
        mount is not None
        and umount is not None
        and subprocess.run(
            [mount, "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
        ).returncode
        == 0
    )
    try:
        yield path if mounted else None
    finally:
        if mounted and subprocess.run([umount, str(path)], capture_output=True).returncode != 0:
            subprocess.run([umount, "-l", str(path)], capture_output=True)  # a process still holds a file


def fill_disk(path: Path) -> int:
    """Writes zeros to `path` until its file system answers ENOSPC; returns the bytes written."""
    written, chunk = 0, bytes(64 * 1024)
    with open(path, "wb", buffering=0) as handle:
        while True:
            try:
                written += handle.write(chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                return written


class IngressReplicaLogs:
    """Which ingress replica handled a request, from Serve's per-replica log files (module docstring)."""

    def __init__(self, app_name: str):
        import ray

        self.folder = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
        self.pattern = f"replica_{app_name}_PolicyIngress_*.log"
        self.read: dict[Path, int] = {}  # bytes of whole lines read so far, per file
        self.text: dict[Path, str] = {}

    def replica_of(self, response, timeout_s: float = 10.0) -> str:
        """The replica id whose log holds the response's X-Request-ID (waits for the line to land)."""
        request_id = response.headers["x-request-id"]
        waited_until = time.monotonic() + timeout_s
        while True:
            for path in self.folder.glob(self.pattern):
                with path.open("rb") as handle:
                    handle.seek(self.read.get(path, 0))
                    new = handle.read()
                whole = new[: new.rfind(b"\n") + 1]
                self.read[path] = self.read.get(path, 0) + len(whole)
                self.text[path] = self.text.get(path, "") + whole.decode("utf-8", "replace")
                if request_id in self.text[path]:
                    return path.stem.rsplit("_", 1)[1]
            assert time.monotonic() < waited_until, f"request {request_id} is in no ingress replica's log"
            time.sleep(0.05)


@pytest.fixture(scope="module")
def identity_app(ray_cluster, serve_home, tmp_path_factory):
    from mobile_vla.serve.app import ServeAppConfig

    files = tmp_path_factory.mktemp("identity")
    tokens = files / "tokens"
    tokens.write_text((serve_home / "tokens").read_text())  # the home's operator token, then robots' tokens
    robots = {
        "robot-a": add_token(tokens, "ra-*", ("act", "feedback"), "robot-a"),
        "robot-b": add_token(tokens, "rb-1", ("act", "feedback"), "robot-b"),
        "robot-c": add_token(tokens, "rc-1", ("act", "feedback"), "robot-c"),
        "reporter": add_token(tokens, "ra-1", ("feedback",), "reporter"),
        "revoked": add_token(tokens, "rv-1", ("act", "feedback"), "revoked"),  # the revocation test's alone
    }
    keys = files / "memory_secret"
    assert main(["serve", "memory-key", "rotate", "--file", str(keys)]) == 0  # the operator makes it once
    with small_tmpfs(files / "disk") as disk:
        args = ServeAppConfig(
            tokens_file=str(tokens),
            memory_secret_file=str(keys),
            feedback_dir=str(files / "disk" / "feedback"),
            batch_wait_timeout_s=0.0,
            deadline_s=30.0,  # a loaded 2-core box: this test is about identity, not latency
        )
        # Serve replaces a dead replica at its next health check: every second here, not every 10 s
        ingress = {"num_replicas": INGRESS_REPLICAS, "health_check_period_s": 1.0}
        with deployed_app(APP, serve_home, args, ingress_options=ingress) as app:
            app.robot_tokens, app.tokens_file, app.keys_file = robots, tokens, keys
            app.disk, app.feedback_dir, app.logs = disk, files / "disk" / "feedback", IngressReplicaLogs(APP)
            yield app


def _act(app, token: str, robot_id: str, memory: str | None = None):
    body = {"robot_id": robot_id, "instruction": "go to the red box", "image": IMAGE, "state": [0.0, 0.0, 0.0]}
    if memory is not None:
        body["memory"] = memory
    return app.http.post("/v1/act", json=body, headers={"Authorization": f"Bearer {token}"})


def _feedback(app, token: str, robot_id: str, **over):
    body = {
        "robot_id": robot_id,
        "episode_id": "e-1",
        "step": 0,
        "instruction": "go to the red box",
        "image": IMAGE,
        "state": [0.0, 0.0, 0.0],
        "action_executed": [0.1, 0.0, 0.0],
        "action_corrected": [0.0, 0.0, 0.0],
        "success": True,
        **over,
    }
    return app.http.post("/v1/feedback", json=body, headers={"Authorization": f"Bearer {token}"})


def _replicas_answering(app, token: str, robot_id: str, status: int, replicas: int = INGRESS_REPLICAS) -> set[str]:
    """Acts until `replicas` distinct ingress replicas answered; every answer must have `status`."""
    seen = set()
    for _ in range(60):  # the proxy picks a replica at random: 60 misses in a row do not happen
        answer = _act(app, token, robot_id)
        assert answer.status_code == status, answer.text
        seen.add(app.logs.replica_of(answer))
        if len(seen) == replicas:
            return seen
    raise AssertionError(f"only ingress replicas {seen} answered")


def test_a_token_speaks_only_for_its_robots_and_scopes(identity_app):
    app, tokens = identity_app, identity_app.robot_tokens
    assert _act(app, tokens["robot-a"], "ra-1").status_code == 200
    assert _act(app, tokens["robot-a"], "ra-2").status_code == 200  # the prefix ra-*
    as_b = _act(app, tokens["robot-a"], "rb-1")
    assert as_b.status_code == 403, as_b.text
    error = as_b.json()["error"]
    assert error["code"] == "forbidden" and "'rb-1'" in error["message"] and "robot-a" in error["message"]
    assert _act(app, tokens["robot-b"], "rb-1").status_code == 200
    assert _act(app, tokens["robot-b"], "rb-2").status_code == 403

    forged = _feedback(app, tokens["robot-a"], "rb-1")  # invented corrections for another robot
    assert forged.status_code == 403 and forged.json()["error"]["code"] == "forbidden"
    assert _feedback(app, tokens["robot-a"], "ra-1").status_code == 202
    assert _feedback(app, tokens["reporter"], "ra-1").status_code == 202
    no_scope = _act(app, tokens["reporter"], "ra-1")
    assert no_scope.status_code == 403 and "'act' scope" in no_scope.json()["error"]["message"]


def test_model_and_readiness_details_only_for_operators(identity_app):
    app = identity_app
    robot = {"Authorization": f"Bearer {app.robot_tokens['robot-a']}"}
    summary = app.http.get("/v1/model", headers=robot)
    assert summary.status_code == 200
    assert set(summary.json()) == {"name", "version", "state_dim", "state_input", "chunk", "safety"}  # no backends
    assert (summary.json()["state_dim"], summary.json()["state_input"]) == (3, "previous_command")
    details = app.http.get("/v1/model", headers=app.auth).json()
    assert details["backends"] and details["active"] == "OnnxPolicy" and details["uri"].startswith("models:/")

    for headers in ({}, robot, {"Authorization": "Bearer not-a-token-0123456789"}):
        ready = app.http.get("/readyz", headers=headers)
        assert ready.status_code == 200 and ready.json() == {"status": "ready"}
    ready = app.http.get("/readyz", headers=app.auth).json()
    assert ready["status"] == "ready" and {b["role"] for b in ready["backends"]} == {"primary"}


def _log_state(root: Path) -> tuple[dict[str, int], list[str]]:
    """The feedback log as stored: {segment: size} (each must scan clean) and its record keys."""
    store = FeedbackStore(root, repair=False)
    scans = store.scan()
    assert all(scan.problem is None and not scan.skipped for scan in scans), scans
    keys = [f"{r.meta['robot_id']}/{r.meta['episode_id']}/{r.meta['step']}" for r in store.replay()]
    return {scan.name: scan.size for scan in scans}, keys


def test_a_full_feedback_disk_answers_507_leaves_nothing_and_recovers_when_space_is_freed(identity_app):
    app, tokens = identity_app, identity_app.robot_tokens
    if app.disk is None:
        pytest.skip("mounting a tmpfs needs CAP_SYS_ADMIN; the store-level full-disk tests cover the log")
    step = {"episode_id": "disk-full", "step": 3, "action_executed": [0.2, 0.0, -0.1]}
    assert _feedback(app, tokens["robot-a"], "ra-3", **{**step, "step": 2}).status_code == 202  # a segment is open
    before = _log_state(app.feedback_dir)
    ballast = app.disk / "ballast"
    assert fill_disk(ballast) > 0
    try:
        refused_by = set()
        for _ in range(60):  # the same step, retried, until both ingress replicas refused it
            full = _feedback(app, tokens["robot-a"], "ra-3", **step)
            assert full.status_code == 507, full.text
            error = full.json()["error"]  # the error schema of docs/http_api.md, nothing else
            assert set(full.json()) == {"error"} and set(error) == {"code", "message"}
            assert error["code"] == "insufficient_storage" and "full" in error["message"]
            assert full.headers["Retry-After"] == "30"
            refused_by.add(app.logs.replica_of(full))
            if len(refused_by) == INGRESS_REPLICAS:
                break
        assert len(refused_by) == INGRESS_REPLICAS, f"only replicas {refused_by} were asked"
        assert _log_state(app.feedback_dir) == before  # no partial frame, no empty segment: byte for byte
        assert _act(app, tokens["robot-a"], "ra-3").status_code == 200  # the same robot still drives
        assert _act(app, tokens["robot-c"], "rc-1").status_code == 200  # and another robot too
    finally:
        ballast.unlink()  # an operator frees space
    stored = _feedback(app, tokens["robot-a"], "ra-3", **step)  # the robot's next retry, nothing restarted
    assert stored.status_code == 202 and stored.json()["key"] == "ra-3/disk-full/3", stored.text
    stored_steps = FeedbackStore(app.feedback_dir, repair=False).replay()
    (record,) = [r for r in stored_steps if r.meta["episode_id"] == "disk-full" and r.meta["step"] == 3]
    assert record.meta["robot_id"] == "ra-3" and record.meta["action_executed"] == [0.2, 0.0, -0.1]
    assert sorted(_log_state(app.feedback_dir)[1]) == sorted([*before[1], "ra-3/disk-full/3"])  # once, whole


def test_a_revoked_token_gets_401_from_every_replica_old_and_new_within_10_s(identity_app):
    import ray

    app, tokens = identity_app, identity_app.robot_tokens
    old = _replicas_answering(app, tokens["revoked"], "rv-1", 200)  # both ingress replicas serve it
    assert main(["serve", "tokens", "revoke", "--file", str(app.tokens_file), "--name", "revoked"]) == 0
    revoked_at = time.monotonic()
    refused = set()
    while refused != old:  # until each replica has refused the token
        answer = _act(app, tokens["revoked"], "rv-1")
        assert answer.status_code in (200, 401), answer.text
        replica, waited = app.logs.replica_of(answer), time.monotonic() - revoked_at
        if answer.status_code == 401:
            refused.add(replica)
        assert replica not in refused or answer.status_code == 401, f"replica {replica} accepted the token again"
        assert waited < REVOCATION_LIMIT_S, f"replicas {old - refused} still accept the revoked token"
        time.sleep(0.1)
    assert all(_act(app, tokens["revoked"], "rv-1").status_code == 401 for _ in range(5))
    assert _feedback(app, tokens["revoked"], "rv-1").status_code == 401

    # A replica started after the edit (Serve replaces a killed one, as after a crash or a scale-up).
    killed = sorted(old)[0]
    ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP}#PolicyIngress#{killed}", namespace="serve"))
    killed_at, started = time.monotonic(), set()
    while not started:
        answer = _act(app, tokens["revoked"], "rv-1")
        assert answer.status_code != 200, "the revoked token was accepted after a replica restart"
        if answer.status_code == 401:  # else the proxy's own error for the killed replica, once
            started = {app.logs.replica_of(answer)} - old
        assert time.monotonic() - killed_at < REPLICA_START_LIMIT_S, "no new ingress replica answered"
        time.sleep(0.2)
    live = (old - {killed}) | started
    assert _replicas_answering(app, tokens["robot-a"], "ra-1", 200) == live  # the others keep working everywhere
    assert all(_act(app, tokens["revoked"], "rv-1").status_code == 401 for _ in range(5))


def test_memory_key_rotation_keeps_old_tokens_valid_in_the_window(identity_app):
    app, token = identity_app, identity_app.robot_tokens["robot-a"]
    first = _act(app, token, "ra-7").json()
    old_key = first["memory"].split(".")[1]
    assert main(["serve", "memory-key", "rotate", "--file", str(app.keys_file), "--window-s", "600"]) == 0
    rotated_at = time.monotonic()
    while True:
        answer = _act(app, token, "ra-7", memory=first["memory"])  # signed with the previous key
        assert answer.status_code == 200, answer.text
        assert answer.json()["memory_reset"] is False
        if answer.json()["memory"].split(".")[1] != old_key:
            break  # new tokens use the new key
        assert time.monotonic() - rotated_at < REVOCATION_LIMIT_S, "the replica still signs with the old key"
        time.sleep(0.2)
    forged = _act(app, token, "ra-7", memory=".".join(["m2", "0badc0de", *first["memory"].split(".")[2:]]))
    assert forged.status_code == 400 and forged.json()["error"]["code"] == "invalid_memory"
