"""The safety ladder over real HTTP: the Serve app serving the tiny random-weight version (its novelty
statistics fitted on MiniWorld frames by `register_random_policy`), ONNX Runtime CPU on the shared cluster.

What the random-weight tiny model can and cannot show: its novelty separates MiniWorld scene frames from
blank ones through the pixel layout part of the vision feature (tests/runtime/test_safety_outputs.py);
its confidence means nothing, so the confidence rule is checked by the unit tests (test_safety.py).
"""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from mobile_vla.export.parity import parity_frames
from mobile_vla.serve.model_side import load_model_side
from tests.legacy_artifacts import downgrade_to_signature_v1

APP = "mobile-vla-safety"
pytestmark = pytest.mark.slow  # one Serve app for the module: about a minute to deploy on 2 cores


def _png(frame: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _act(app, image: str, robot_id: str, memory: str | None = None, **extra):
    body = {"robot_id": robot_id, "instruction": "go to the red box", "image": image, "state": [0.1, 0.0, -0.2]}
    if memory is not None:
        body["memory"] = memory
    return app.http.post("/v1/act", json={**body, **extra}, headers=app.auth)


@pytest.fixture(scope="module")
def app(ray_cluster, serve_home):
    from tests.serve.conftest import deployed_app

    args = {"tokens_file": str(serve_home / "tokens"), "safety": {"handover_after_stops": 2, "slow_factor": 0.25}}
    with deployed_app(APP, serve_home, args) as client:
        yield client


@pytest.fixture(scope="module")
def scene_frames() -> np.ndarray:
    """MiniWorld frames from rooms the sample version's statistics saw neither of (another render seed)."""
    return parity_frames(8, seed=57).images


def test_model_info_reports_novelty_on_and_the_thresholds_in_force(app):
    info = app.model()
    safety = info["safety"]
    assert safety["enabled"] is True and safety["novelty"] is True, safety
    assert safety["slow_factor"] == 0.25 and safety["handover_after_stops"] == 2
    thresholds = safety["thresholds"]
    assert 0 < thresholds["novelty_slow"] < thresholds["novelty_stop"]
    assert thresholds["stale_slow_ms"] == pytest.approx(200.0)  # one control period at 5 Hz
    assert thresholds["stale_stop_ms"] == pytest.approx(info["chunk"] * 200.0)


def test_scene_frames_are_mostly_normal_and_a_blank_frame_is_not(app, scene_frames):
    levels = []
    for i, frame in enumerate(scene_frames):
        response = _act(app, _png(frame), robot_id=f"scene-{i}")
        assert response.status_code == 200, response.text
        safety = response.json()["safety"]
        assert safety["novelty"] is not None and 0 <= safety["confidence_now"] <= 1
        levels.append(safety)
    # the sample's statistics come from 64 frames of other rooms: a room it never saw may score novel too
    assert sum("novel_frame" not in s["reasons"] for s in levels) >= 4, levels
    blank = _act(app, _png(np.zeros((224, 224, 3), np.uint8)), robot_id="covered")
    assert blank.status_code == 200, blank.text
    body = blank.json()
    assert body["safety"]["level"] in ("slow", "stop"), body["safety"]
    assert "novel_frame" in body["safety"]["reasons"]
    assert body["safety"]["novelty"] > max(s["novelty"] for s in levels)
    factor = {"slow": 0.25, "stop": 0.0}[body["safety"]["level"]]
    assert body["safety"]["speed_factor"] == factor


def test_a_stale_step_stops_with_zero_actions_and_repeated_stops_hand_over(app, scene_frames):
    image = _png(scene_frames[0])
    fresh = _act(app, image, robot_id="late-1")
    assert fresh.json()["safety"]["stale_ms"] is None  # no delay_ms: never stale
    first = _act(app, image, robot_id="late-1", memory=fresh.json()["memory"], delay_ms=5000)
    body = first.json()
    assert body["safety"]["level"] == "stop" and "stale" in body["safety"]["reasons"], body["safety"]
    assert body["safety"]["stale_ms"] >= 5000
    assert body["actions"] == [[0.0, 0.0, 0.0]] * len(body["actions"])
    second = _act(app, image, robot_id="late-1", memory=body["memory"], delay_ms=5000).json()
    assert second["safety"]["level"] == "handover"
    assert second["safety"]["reasons"][0] == "consecutive_stops"
    assert second["actions"] == [[0.0, 0.0, 0.0]] * len(second["actions"])
    again = _act(app, image, robot_id="late-1", memory=second["memory"], delay_ms=250).json()  # slow: count restarts
    assert again["safety"]["level"] != "handover"
    assert again["safety"]["stale_ms"] >= 250


def test_a_bad_delay_is_refused_naming_the_field(app, scene_frames):
    response = _act(app, _png(scene_frames[0]), robot_id="bad-delay", delay_ms=-5)
    assert response.status_code == 422
    assert "delay_ms" in response.json()["error"]["message"]


def test_an_old_export_serves_with_novelty_off_and_says_why(exported_copy):
    """A version exported under signature_version 1 (no vision_features output): the ingress's view of it."""
    side = load_model_side(str(downgrade_to_signature_v1(exported_copy)))
    assert side.novelty is False and side.calibrated is None
    assert "signature_version 1" in side.safety_note
