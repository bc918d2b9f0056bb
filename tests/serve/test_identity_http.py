"""Tokens bound to robots and scopes, revocation and memory-key rotation, against the real Serve app
(tiny exported model, ONNX Runtime CPU primary) with its own tokens and memory-key files."""

from __future__ import annotations

import base64
import io
import time

import numpy as np
import pytest
from PIL import Image

from mobile_vla.cli import main
from mobile_vla.serve.auth import add_token
from tests.serve.conftest import deployed_app

pytestmark = pytest.mark.slow  # deploys its own app: about a minute on 2 cores

REVOCATION_LIMIT_S = 10.0  # issue 16: every replica answers 401 within 10 s of the edit


def _image() -> str:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return base64.b64encode(buffer.getvalue()).decode()


IMAGE = _image()


@pytest.fixture(scope="module")
def identity_app(ray_cluster, serve_home, tmp_path_factory):
    from mobile_vla.serve.app import ServeAppConfig

    files = tmp_path_factory.mktemp("identity")
    tokens = files / "tokens"
    tokens.write_text((serve_home / "tokens").read_text())  # the home's operator token, then robots' tokens
    robots = {
        "robot-a": add_token(tokens, "ra-*", ("act", "feedback"), "robot-a"),
        "robot-b": add_token(tokens, "rb-1", ("act", "feedback"), "robot-b"),
        "reporter": add_token(tokens, "ra-1", ("feedback",), "reporter"),
    }
    keys = files / "memory_secret"
    assert main(["serve", "memory-key", "rotate", "--file", str(keys)]) == 0  # the operator makes it once
    args = ServeAppConfig(
        tokens_file=str(tokens),
        memory_secret_file=str(keys),
        feedback_dir=str(files / "feedback"),
        batch_wait_timeout_s=0.0,
        deadline_s=30.0,  # a loaded 2-core box: this test is about identity, not latency
    )
    with deployed_app("mobile-vla-identity", serve_home, args) as app:
        app.robot_tokens, app.tokens_file, app.keys_file = robots, tokens, keys
        yield app


def _act(app, token: str, robot_id: str, memory: str | None = None):
    body = {"robot_id": robot_id, "instruction": "go to the red box", "image": IMAGE, "state": [0.0, 0.0, 0.0]}
    if memory is not None:
        body["memory"] = memory
    return app.http.post("/v1/act", json=body, headers={"Authorization": f"Bearer {token}"})


def _feedback(app, token: str, robot_id: str):
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
    }
    return app.http.post("/v1/feedback", json=body, headers={"Authorization": f"Bearer {token}"})


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
    assert set(summary.json()) == {"name", "version", "state_dim", "state_input", "chunk"}
    assert (summary.json()["state_dim"], summary.json()["state_input"]) == (3, "previous_command")
    details = app.http.get("/v1/model", headers=app.auth).json()
    assert details["backends"] and details["active"] == "OnnxPolicy" and details["uri"].startswith("models:/")

    for headers in ({}, robot, {"Authorization": "Bearer not-a-token-0123456789"}):
        ready = app.http.get("/readyz", headers=headers)
        assert ready.status_code == 200 and ready.json() == {"status": "ready"}
    ready = app.http.get("/readyz", headers=app.auth).json()
    assert ready["status"] == "ready" and {b["role"] for b in ready["backends"]} == {"primary"}


def test_a_revoked_token_gets_401_within_10_s_without_a_redeploy(identity_app):
    app, tokens = identity_app, identity_app.robot_tokens
    assert _act(app, tokens["robot-b"], "rb-1").status_code == 200
    assert main(["serve", "tokens", "revoke", "--file", str(app.tokens_file), "--name", "robot-b"]) == 0
    revoked_at = time.monotonic()
    while _act(app, tokens["robot-b"], "rb-1").status_code != 401:
        assert time.monotonic() - revoked_at < REVOCATION_LIMIT_S, "the revoked token still works"
        time.sleep(0.2)
    assert time.monotonic() - revoked_at < REVOCATION_LIMIT_S
    assert all(_act(app, tokens["robot-b"], "rb-1").status_code == 401 for _ in range(5))
    assert _feedback(app, tokens["robot-b"], "rb-1").status_code == 401
    assert _act(app, tokens["robot-a"], "ra-1").status_code == 200  # the others keep working


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
