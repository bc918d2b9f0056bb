"""Hot swap on the real Serve app: `@champion` moves (exactly as the MLflow UI moves it, via
tracking.set_alias) while client threads hammer /v1/act.

The primary is an ONNX Runtime deployment whose "engine build" for a new version is a configured
delay (the test-only drill's `primary_prepare_delay_s`, standing in for TensorRT): meanwhile the
ONNX fallback must serve the new version, then traffic returns to the primary. One deployment, swapped several times.
"""

from __future__ import annotations

import base64
import io
import threading

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.serve.conftest import deployed_app, wait_until

APP = "mobile-vla-hot-swap"
NAME = "mobile-vla-policy"

pytestmark = pytest.mark.slow  # Serve apps deployed, swapped and rolled back: minutes on 2 cores
PRIMARY, FALLBACK = "OnnxPolicy", "OnnxFallbackPolicy"
ENGINE_BUILD_S = 6.0


def _image(seed=0) -> str:
    pixels = np.random.default_rng(seed).integers(0, 255, (240, 320, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=85)
    return base64.b64encode(buffer.getvalue()).decode()


IMAGE = _image()


@pytest.fixture(scope="module")
def swap_home(tmp_path_factory, use_home, serve_home):
    """v1 @champion, v2 @challenger (v1's files, actions offset by 0.1), v3 without onnx/.
    Copies of the session's exported tiny model, so no ONNX export runs here."""
    from mobile_vla.serve.auth import create_tokens_file
    from mobile_vla.serve.sample_model import register_version_copy
    from mobile_vla.tracking import resolve_model

    with use_home(serve_home):
        exported = resolve_model(f"models:/{NAME}/1").path
    home = tmp_path_factory.mktemp("hot-swap-home")
    with use_home(home):
        assert register_version_copy(exported, NAME, alias="champion") == "1"
        assert register_version_copy(exported, NAME, alias="challenger", action_offset=0.1) == "2"
        assert register_version_copy(exported, NAME, alias="unexported", with_onnx=False) == "3"
    (home / "token").write_text(create_tokens_file(home / "tokens"))
    return home


@pytest.fixture(scope="module")
def app(ray_cluster, swap_home):
    from mobile_vla.serve.app import ServeAppConfig
    from mobile_vla.serve.drills import DrillConfig

    args = ServeAppConfig(
        tokens_file=str(swap_home / "tokens"),
        fallback="onnx",
        max_batch_size=8,
        batch_wait_timeout_s=0.01,
        primary_timeout_s=20.0,
        alias_poll_s=0.3,
        deadline_s=30.0,  # a loaded 2-core box: this test is about the swap, not latency
    )
    drill = DrillConfig(primary_prepare_delay_s=ENGINE_BUILD_S)  # test-only: the primary's "engine build"
    with deployed_app(APP, swap_home, args, drill=drill) as client:
        yield client


def _move_champion(home, version: str, use_home) -> None:
    from mobile_vla.tracking import set_alias

    with use_home(home):
        set_alias(NAME, "champion", version)


class Hammer:
    """Client threads stepping their own robot (memory token chained) until stopped."""

    def __init__(self, app, threads: int = 4):
        self.app, self.stop = app, threading.Event()
        self.log: list[list[tuple]] = [[] for _ in range(threads)]  # per thread: (status, version, served_by, reset)
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, i: int) -> None:
        memory = None
        with httpx.Client(base_url=self.app.url, timeout=60, headers=self.app.auth) as http:
            while not self.stop.is_set():
                body = {
                    "robot_id": f"load-{i}",
                    "instruction": "go to the red box",
                    "image": IMAGE,
                    "state": [0.1, 0.0, -0.2],
                    **({"memory": memory} if memory else {}),
                }
                try:
                    r = http.post("/v1/act", json=body)
                except httpx.HTTPError as exc:
                    self.log[i].append((type(exc).__name__, None, None, None))
                    continue
                if r.status_code != 200:
                    self.log[i].append((r.status_code, None, None, None))
                    continue
                answer = r.json()
                memory = answer["memory"]
                self.log[i].append((200, answer["model"]["version"], r.headers["x-served-by"], answer["memory_reset"]))

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)

    def answers(self):
        return [entry for log in self.log for entry in log]

    def last(self):
        return [log[-1] for log in self.log if log]


def _serving(app, version: str) -> bool:
    """The alias points at `version` and the primary serves it."""
    info = app.model()
    return info["version"] == info["alias_version"] == version and info["active"] == PRIMARY


def test_hot_swap_under_load_switches_once_with_no_failed_request(app, swap_home, use_home):
    _move_champion(swap_home, "1", use_home)  # whatever another test left: start from version 1
    wait_until(lambda: _serving(app, "1"), 120, every_s=0.5, what="the primary serving version 1")
    assert app.act(IMAGE).json()["model"]["version"] == "1"
    transitions = []  # what /v1/model said while the primary was "building its engine"
    with Hammer(app) as hammer:
        wait_until(lambda: all(len(log) >= 2 for log in hammer.log), 120, what="every client answered")
        _move_champion(swap_home, "2", use_home)

        def primary_took_over():
            info = app.model()
            primary = next(b for b in info["backends"] if b["role"] == "primary")
            transitions.append((info["active"], primary["model_version"], primary["pending_version"]))
            last = hammer.last()
            return len(last) == 4 and all(v == "2" and by == PRIMARY for _, v, by, _ in last)

        wait_until(primary_took_over, 180, every_s=0.5, what="the primary serving version 2 to every client")
        seen = [len(log) for log in hammer.log]  # then a few more answers each: the switch must hold
        wait_until(
            lambda: all(len(log) >= n + 3 for log, n in zip(hammer.log, seen, strict=True)),
            60,
            what="more answers after the switch",
        )
    answers = hammer.answers()
    assert [a[0] for a in answers] == [200] * len(answers), [a for a in answers if a[0] != 200][:5]
    for log in hammer.log:  # per robot: 1 ... 1 2 ... 2, never back
        versions = [v for _, v, _, _ in log]
        first_new = versions.index("2")
        assert set(versions[:first_new]) == {"1"} and set(versions[first_new:]) == {"2"}, versions
        assert log[first_new][3] is True  # its memory token belonged to version 1: fresh recurrent state
        assert not any(reset for _, _, _, reset in log[first_new + 1 :])
    # While the primary prepared version 2, the ONNX fallback served it at once; then traffic returned.
    assert any(v == "2" and by == FALLBACK for _, v, by, _ in answers), "fallback never served the new version"
    assert any(active == FALLBACK and version == "1" and pending == "2" for active, version, pending in transitions)
    info = app.model()
    assert (info["version"], info["alias_version"], info["active"]) == ("2", "2", PRIMARY)
    assert app.policy_info(PRIMARY)["swaps"] >= 1 and app.policy_info(FALLBACK)["model_version"] == "2"


def test_failed_load_keeps_the_old_model_and_shows_why(app, swap_home, use_home):
    import ray

    _move_champion(swap_home, "2", use_home)  # whatever another test left: start from version 2
    wait_until(lambda: _serving(app, "2"), 120, every_s=0.5, what="the primary serving version 2")
    assert app.act(IMAGE).json()["model"]["version"] == "2"
    with Hammer(app, threads=2) as hammer:
        _move_champion(swap_home, "3", use_home)  # registered without onnx/: no backend can load it

        def both_failed():
            infos = [app.policy_info(d) for d in (PRIMARY, FALLBACK)]
            return all(i["failed_version"] == "3" for i in infos) and len(hammer.answers()) >= 6

        wait_until(both_failed, 120, every_s=0.5, what="both deployments reporting version 3 as failed")
    answers = hammer.answers()
    assert answers and all(status == 200 and version == "2" for status, version, _, _ in answers), answers[:5]
    info = app.model()
    assert info["version"] == "2" and info["alias_version"] == "3"
    for backend in info["backends"]:
        assert backend["model_version"] == "2" and backend["loaded"]
        assert backend["failed_version"] == "3" and "onnx" in backend["failed_reason"].lower(), backend
    assert app.act(IMAGE).json()["model"]["version"] == "2"

    port = ray._private.worker.global_worker.node.metrics_export_port

    def exported():
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        return [
            line
            for line in text.splitlines()
            if line.startswith("ray_mobile_vla_model_load_failures_total") and not line.endswith(" 0.0")
        ]

    assert wait_until(exported, 60, every_s=2, what="the load failure on Ray's metrics endpoint")

    # Moving the alias back (a rollback) clears the failure; version 2 keeps serving throughout.
    _move_champion(swap_home, "2", use_home)
    # The replicas and the ingress each poll the registry on their own (every alias_poll_s): wait for both.
    wait_until(
        lambda: (
            (info := app.model())["alias_version"] == "2" and all(b["failed_version"] is None for b in info["backends"])
        ),
        30,
        what="the rollback clearing the failure in the replicas and the ingress",
    )
    assert app.act(IMAGE).json()["model"]["version"] == "2"
