"""The real Serve app on the shared local Ray cluster: tiny exported model, ONNX Runtime CPU primary
plus an ONNX fallback deployment; every check goes through HTTP on 127.0.0.1."""

from __future__ import annotations

import base64
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from mobile_vla.serve.memory_token import MemoryCodec, RecurrentMemory, load_or_create_secret
from tests.local_processes import wait_until
from tests.serve.conftest import serve_on_loopback

APP = "mobile-vla-test"

pytestmark = pytest.mark.slow  # one Serve app for the module: about a minute to deploy on 2 cores
INSTRUCTION = "go to the red box"


def _jpeg(width=320, height=240, seed=0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


IMAGE = base64.b64encode(_jpeg()).decode()


class Served:
    def __init__(self, url: str, token: str, home: Path):
        self.url, self.token, self.home = url, token, home
        self.http = httpx.Client(base_url=url, timeout=30)
        self.auth = {"Authorization": f"Bearer {token}"}

    def act(self, robot_id="r-1", memory=None, **over) -> httpx.Response:
        body = {"robot_id": robot_id, "instruction": INSTRUCTION, "image": IMAGE, "state": [0.1, 0.0, -0.2]}
        if memory is not None:
            body["memory"] = memory
        body.update(over)
        return self.http.post("/v1/act", json=body, headers=self.auth)

    def policy_info(self, name="OnnxPolicy") -> dict:
        from ray import serve

        return serve.get_deployment_handle(name, app_name=APP).info.remote().result()


@pytest.fixture(scope="module")
def served(ray_cluster, serve_home, use_home):
    from ray import serve

    from mobile_vla.serve.app import ServeAppConfig, compose_app
    from mobile_vla.serve.drills import DrillConfig

    port = serve_on_loopback()

    # Test-only faults hit robots named drill-slow-* / drill-error-* only; everyone else gets a healthy primary.
    drill = DrillConfig(
        primary_faults=[
            {"mode": "slow", "robot_prefix": "drill-slow-", "delay_s": 30.0},
            {"mode": "error", "robot_prefix": "drill-error-"},
        ]
    )
    args = ServeAppConfig(
        tokens_file=str(serve_home / "tokens"),
        fallback="onnx",
        max_batch_size=16,
        batch_wait_timeout_s=0.05,
        primary_timeout_s=4.0,
        deadline_s=60.0,  # the drills stall the primary for seconds: the fallback must still have time
        breaker_failures=2,
        breaker_reset_s=1.0,
    )
    with use_home(serve_home):
        serve.run(compose_app(args, drill=drill), name=APP, route_prefix="/")
    app = Served(f"http://127.0.0.1:{port}", (serve_home / "token").read_text(), serve_home)
    yield app
    app.http.close()
    serve.delete(APP)


def _error(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    return body["error"]


# -- the happy path -----------------------------------------------------------------------------------
def test_act_round_trip_and_memory_token(served):
    first = served.act()
    assert first.status_code == 200, first.text
    body = first.json()
    assert set(body) == {
        *("actions", "confidence", "memory", "model", "backend", "memory_reset", "latency_ms", "safety"),
        *("queue_ms", "compute_ms", "anchor_step"),
    }
    assert body["anchor_step"] is None  # no step cursor sent
    assert body["compute_ms"] > 0 and 0 <= body["queue_ms"] <= body["latency_ms"]
    assert body["safety"]["level"] in ("normal", "slow", "stop", "handover"), body["safety"]
    actions = np.asarray(body["actions"])
    assert actions.shape == (10, 3) and np.isfinite(actions).all()
    assert (np.abs(actions[:, :2]) <= 0.5 + 1e-6).all() and (np.abs(actions[:, 2]) <= 1.0 + 1e-6).all()
    assert 0.0 <= body["confidence"] <= 1.0
    assert body["backend"] == "onnx-cpu" and body["model"] == {"name": "mobile-vla-policy", "version": "1"}
    assert body["memory_reset"] is False and first.headers["x-served-by"] == "OnnxPolicy"

    second = served.act(memory=body["memory"], step=7)
    again = served.act(memory=body["memory"])  # a retry with the same token is the same step
    assert second.json()["anchor_step"] == 7  # the robot's step cursor, echoed: actions[0] is for step 7
    assert second.status_code == again.status_code == 200
    assert second.json()["memory_reset"] is False
    assert second.json()["actions"] == again.json()["actions"]
    assert second.json()["memory"] != body["memory"]  # the LSTM state moved on
    codec = MemoryCodec(load_or_create_secret(served.home / "serve" / "memory_secret"))
    state = codec.decode(second.json()["memory"])
    assert state.model_version == "1" and state.robot_id == "r-1" and np.abs(state.h).sum() > 0


def test_memory_from_another_model_version_is_reset(served):
    codec = MemoryCodec(load_or_create_secret(served.home / "serve" / "memory_secret"))
    fresh = served.act(robot_id="r-2").json()
    current = codec.decode(fresh["memory"])
    stale = codec.encode(RecurrentMemory(current.model_name, "0", "r-2", current.h + 1.0, current.c + 1.0))
    answer = served.act(robot_id="r-2", memory=stale)
    assert answer.status_code == 200 and answer.json()["memory_reset"] is True
    assert answer.json()["actions"] == fresh["actions"]  # the same frame from a zero state
    assert codec.decode(answer.json()["memory"]).model_version == "1"


def test_batches_form_under_concurrent_load(served):
    before = served.policy_info()
    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(lambda i: served.act(robot_id=f"fleet-{i}"), range(48)))
    assert [a.status_code for a in answers] == [200] * 48
    after = served.policy_info()
    requests = after["batched_requests"] - before["batched_requests"]
    batches = after["batches"] - before["batches"]
    calls = after["calls"] - before["calls"]  # the ingress gathers its own batches: one call each
    assert requests == 48 and batches < requests and calls < requests, (requests, batches, calls)


def test_each_act_tokenises_its_instruction_once_in_the_policy_replica(served):
    # The ingress holds no tokenizer; the policy replica's instruction cache counts every lookup:
    # a miss is the one tokenisation of an instruction, a hit a request served without tokenising.
    instruction = "go to the green ball by the far wall"  # no other test sends it
    before = served.policy_info()["instructions"]
    answers = [served.act(robot_id="tok-1", instruction=instruction) for _ in range(3)]
    assert [(a.status_code, a.headers["x-served-by"]) for a in answers] == [(200, "OnnxPolicy")] * 3
    after = served.policy_info()["instructions"]
    assert (after["misses"] - before["misses"], after["hits"] - before["hits"]) == (1, 2)


def test_an_instruction_too_long_for_the_model_is_refused_alone_in_its_batch(served):
    # The replica finds the refused robot inside the batch: 422 for it, its batch-mates served, no fallback.
    long_instruction = "go to the red box and then " * 12
    robots = [f"long-{i}" if i % 3 == 0 else f"short-{i}" for i in range(9)]

    def act(robot):
        return served.act(robot_id=robot, instruction=long_instruction if robot.startswith("long") else INSTRUCTION)

    before = served.policy_info()
    with ThreadPoolExecutor(9) as pool:
        answers = dict(zip(robots, pool.map(act, robots), strict=True))
    after = served.policy_info()
    assert after["calls"] - before["calls"] < len(robots)  # they did share batches
    for robot, answer in answers.items():
        if robot.startswith("long"):
            assert answer.status_code == 422 and _error(answer)["code"] == "invalid_request", answer.text
            assert "tokens, more than" in _error(answer)["message"]  # the tokenizer says which limit
        else:
            assert answer.status_code == 200 and answer.headers["x-served-by"] == "OnnxPolicy", answer.text
    assert served.act(robot_id="r-after-long").headers["x-fallback-reason"] == "none"  # the breaker stayed closed


def test_a_robot_failing_in_a_batch_goes_to_the_fallback_alone(served):
    # drill-error-* robots fail on the primary (test-only fault); their batch-mates keep the primary's answer.
    robots = [f"drill-error-mix-{i}" if i % 4 == 0 else f"mix-{i}" for i in range(16)]
    before = served.policy_info()
    with ThreadPoolExecutor(16) as pool:
        answers = dict(zip(robots, pool.map(lambda robot: served.act(robot_id=robot), robots), strict=True))
    after = served.policy_info()
    assert {r: a.status_code for r, a in answers.items()} == dict.fromkeys(robots, 200)
    assert after["calls"] - before["calls"] < len(robots)  # they did share batches
    for robot, answer in answers.items():
        failing = robot.startswith("drill-error-")
        assert answer.headers["x-served-by"] == ("OnnxFallbackPolicy" if failing else "OnnxPolicy"), robot
        assert answer.headers["x-fallback-reason"] == ("error" if failing else "none"), robot
    assert served.act(robot_id="r-after-mix").headers["x-served-by"] == "OnnxPolicy"  # the breaker closed again


# -- auth and probes ----------------------------------------------------------------------------------
def test_auth_required_health_open(served):
    body = {"robot_id": "r-1", "instruction": INSTRUCTION, "image": IMAGE, "state": [0.0, 0.0, 0.0]}
    missing = served.http.post("/v1/act", json=body)
    wrong = served.http.post("/v1/act", json=body, headers={"Authorization": "Bearer wrong-token-0123456789"})
    assert missing.status_code == wrong.status_code == 401
    assert _error(missing)["code"] == _error(wrong)["code"] == "unauthorized"
    assert served.http.get("/v1/model").status_code == 401
    assert served.http.get("/healthz").json() == {"status": "ok"}
    assert served.http.get("/readyz").json() == {"status": "ready"}  # no details (nor errors) without a token
    ready = served.http.get("/readyz", headers=served.auth)  # the operator token
    assert ready.status_code == 200 and {b["role"] for b in ready.json()["backends"]} == {"primary", "fallback"}
    info = served.http.get("/v1/model", headers=served.auth).json()
    assert (info["name"], info["version"], info["alias"], info["state_dim"], info["chunk"]) == (
        "mobile-vla-policy",
        "1",
        "champion",
        3,
        10,
    )
    assert info["active"] == "OnnxPolicy" and all(b["loaded"] for b in info["backends"])


# -- bad input: each a 4xx with the error schema, never a 5xx -----------------------------------------
def _png(width, height, mode="1") -> str:
    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


BAD_BODIES = {
    "not_base64": ({"image": "%%% not base64 %%%"}, 400, "invalid_image"),
    "not_an_image": ({"image": base64.b64encode(b"hello, this is text" * 20).decode()}, 400, "invalid_image"),
    "truncated_jpeg": ({"image": base64.b64encode(_jpeg()[:1500]).decode()}, 400, "invalid_image"),
    "gif": ({"image": base64.b64encode(b"GIF89a" + b"\0" * 64).decode()}, 400, "invalid_image"),
    "huge_image": ({"image": _png(10_000, 10_000)}, 413, "image_too_large"),
    "inf_state": ({"state": "INF"}, 422, "invalid_request"),
    "float32_overflow_state": ({"state": [1e39, 0.0, 0.0]}, 422, "invalid_request"),  # finite in Python, inf in float32
    "short_deadline_field": ({"deadline_ms": 0}, 422, "invalid_request"),
    "progressive_scan_bomb": ({"image": "SCAN_BOMB"}, 413, "image_too_large"),
    "short_state": ({"state": [0.0, 0.0]}, 422, "invalid_request"),
    "long_state": ({"state": [0.0] * 4}, 422, "invalid_request"),
    "string_state": ({"state": ["a", "b", "c"]}, 422, "invalid_request"),
    "empty_instruction": ({"instruction": "   "}, 422, "invalid_request"),
    "huge_instruction": ({"instruction": "go " * 20_000}, 422, "invalid_request"),
    "too_many_tokens": ({"instruction": "go to the red box and then " * 12}, 422, "invalid_request"),
    "unknown_field": ({"speed": 3}, 422, "invalid_request"),
    "bad_robot_id": ({"robot_id": "../../etc/passwd"}, 422, "invalid_request"),
    "forged_memory": ({"memory": "m1.AAAA.BBBB"}, 400, "invalid_memory"),
    "garbage_memory": ({"memory": "definitely not a token"}, 400, "invalid_memory"),
}


@pytest.mark.parametrize("case", sorted(BAD_BODIES))
def test_bad_act_bodies_get_4xx_with_schema(served, case):
    change, status, code = BAD_BODIES[case]
    body = {"robot_id": "r-bad", "instruction": INSTRUCTION, "image": IMAGE, "state": [0.0, 0.0, 0.0], **change}
    text = json.dumps(body)
    text = text.replace('"SCAN_BOMB"', json.dumps(_scan_bomb()))
    if case == "inf_state":
        text = text.replace('"INF"', "[1e999, 0.0, 0.0]")  # JSON number that parses to inf
    response = served.http.post("/v1/act", content=text, headers={**served.auth, "Content-Type": "application/json"})
    assert response.status_code == status, response.text
    assert _error(response)["code"] == code
    if case == "float32_overflow_state":
        assert _error(response)["message"].startswith("state.0:") and "float32" in _error(response)["message"]


def _scan_bomb() -> str:
    """A small progressive JPEG whose scans repeat past the scan budget."""
    raw = base64.b64decode(IMAGE)
    buffer = io.BytesIO()
    Image.open(io.BytesIO(raw)).save(buffer, format="JPEG", progressive=True)
    jpeg = buffer.getvalue()
    head, last = jpeg.index(b"\xff\xda"), jpeg.rindex(b"\xff\xda")
    return base64.b64encode(jpeg[:head] + jpeg[head:last] * 10 + jpeg[last:]).decode()


def test_bad_transport_level_requests(served):
    body = json.dumps({"robot_id": "r-bad", "instruction": INSTRUCTION, "image": IMAGE, "state": [0, 0, 0]})
    cases = [
        (body.replace("[0, 0, 0]", "[NaN, 0, 0]"), "application/json", (400, 422)),
        ("{not json", "application/json", (400,)),
        (body, "text/plain", (415,)),
        (body, "", (415,)),
        (b"{" + b" " * (50 * 1024 * 1024) + b"}", "application/json", (413,)),
    ]
    for content, content_type, statuses in cases:
        headers = {**served.auth, "Content-Type": content_type} if content_type else served.auth
        response = served.http.post("/v1/act", content=content, headers=headers)
        assert response.status_code in statuses, (content_type, response.status_code, response.text[:200])
        _error(response)
    stolen = served.act(robot_id="r-owner").json()["memory"]
    response = served.act(robot_id="r-thief", memory=stolen)
    assert response.status_code == 400 and "another robot" in _error(response)["message"]
    # the replica survived all of it
    assert served.http.get("/healthz").status_code == 200 and served.act().status_code == 200


# -- feedback -----------------------------------------------------------------------------------------
def test_feedback_is_stored_before_202_and_retries_are_duplicates(served):
    from mobile_vla.online.feedback_store import FeedbackStore, describe_feedback

    body = {
        "robot_id": "fb-1",
        "episode_id": "ep-7",
        "step": 3,
        "instruction": INSTRUCTION,
        "image": IMAGE,
        "state": [0.0, 0.1, 0.0],
        "action_executed": [0.2, 0.0, 0.1],
        "action_corrected": [0.1, 0.0, 0.0],
        "intervention": True,
        "episode_done": False,
    }
    first = served.http.post("/v1/feedback", json=body, headers=served.auth)
    retry = served.http.post("/v1/feedback", json=body, headers=served.auth)
    assert first.status_code == retry.status_code == 202 and first.json()["key"] == "fb-1/ep-7/3"
    stored = [r for r in FeedbackStore(served.home / "feedback", repair=False).replay() if r.meta["robot_id"] == "fb-1"]
    assert len(stored) == 2  # both writes are in the log; assembly keeps one per key
    assert stored[0].meta["action_corrected"] == [0.1, 0.0, 0.0] and stored[0].meta["model"]["version"] == "1"
    with Image.open(io.BytesIO(stored[0].image)) as frame:  # the robot's 320x240 JPEG, letterboxed at write
        assert frame.format == "JPEG" and frame.size == (224, 224)
    assert stored[0].meta["image_source_size"] == [320, 240]
    summary = describe_feedback(served.home / "feedback")
    assert summary["unique_steps"] >= 1 and summary["intervention_steps"] >= 1 and summary["torn_or_corrupt"] == []
    bad = served.http.post("/v1/feedback", json={**body, "action_executed": [0.1, 0.2]}, headers=served.auth)
    assert bad.status_code == 422 and _error(bad)["code"] == "invalid_request"
    overflow = served.http.post("/v1/feedback", json={**body, "action_executed": [1e39, 0, 0]}, headers=served.auth)
    assert overflow.status_code == 422 and _error(overflow)["message"].startswith("action_executed.0:")
    assert served.http.post("/v1/feedback", json=body).status_code == 401


# -- fallback: a slow or failing primary (test-only drill faults for drill-* robots) ------------------
def test_slow_then_failing_primary_falls_back_and_breaker_opens(served):
    slow = served.act(robot_id="drill-slow-1")  # primary stalls past primary_timeout_s
    assert slow.status_code == 200 and slow.headers["x-served-by"] == "OnnxFallbackPolicy"
    assert slow.headers["x-fallback-reason"] == "timeout" and slow.json()["backend"] == "onnx-cpu"
    failed = served.act(robot_id="drill-error-1")  # second failure in a row: the breaker opens
    assert failed.status_code == 200 and failed.headers["x-fallback-reason"] == "error"
    bystander = served.act(robot_id="r-bystander")  # no retry of a broken primary on every request
    assert bystander.status_code == 200 and bystander.headers["x-fallback-reason"] == "breaker_open"
    info = served.http.get("/v1/model", headers=served.auth).json()
    primary = next(b for b in info["backends"] if b["role"] == "primary")
    assert primary["breaker"] == "open" and info["active"] == "OnnxFallbackPolicy"

    def primary_breaker() -> str:
        info = served.http.get("/v1/model", headers=served.auth).json()
        return next(b for b in info["backends"] if b["role"] == "primary")["breaker"]

    # cool-down over (however long the box took): one probe goes to the primary, succeeds, the breaker closes
    wait_until(lambda: primary_breaker() == "half_open", 30, what="the breaker's cool-down to end")
    healed = [served.act(robot_id="r-heal").headers["x-served-by"] for _ in range(2)]
    assert healed == ["OnnxPolicy", "OnnxPolicy"] and primary_breaker() == "closed"


# -- metrics: exported through Ray's metrics port (what Prometheus scrapes) ---------------------------
def test_metrics_reach_the_ray_metrics_endpoint(served):
    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    # this test's own traffic (no other test's): a served request, then a timed-out primary's fallback
    assert served.act(robot_id="metrics-1").status_code == 200
    assert served.act(robot_id="drill-slow-metrics").headers["x-fallback-reason"] == "timeout"
    assert served.act(robot_id="metrics-2").headers["x-served-by"] == "OnnxPolicy"  # a success resets the breaker
    # metrics reach the endpoint every few seconds
    wanted = [
        "ray_mobile_vla_requests_total",
        "ray_mobile_vla_batch_size_bucket",
        "ray_mobile_vla_fallbacks_total",
        "ray_mobile_vla_confidence_bucket",
        "ray_mobile_vla_replica_memory_bytes",
        'reason="timeout"',
        'route="/v1/act"',
    ]
    deadline, text = time.monotonic() + 60, ""
    while time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        if all(name in text for name in wanted):
            break
        time.sleep(2)
    missing = [name for name in wanted if name not in text]
    assert not missing, missing


# -- the binary wire form (issue 17): the frame's bytes as the body, the fields in X-Act-Fields -------
def _binary_act(served, fields: dict | None, frame: bytes, content_type="image/jpeg") -> httpx.Response:
    headers = {**served.auth, "Content-Type": content_type}
    if fields is not None:
        headers["X-Act-Fields"] = json.dumps(fields)
    return served.http.post("/v1/act", content=frame, headers=headers)


def test_the_binary_form_answers_as_the_json_form(served):
    fields = {"robot_id": "bin-1", "instruction": INSTRUCTION, "state": [0.1, 0.0, -0.2]}
    binary = _binary_act(served, fields, base64.b64decode(IMAGE))
    as_json = served.act(robot_id="bin-1")  # the same frame, state and fresh memory, as base64 JSON
    assert binary.status_code == as_json.status_code == 200, binary.text
    assert set(binary.json()) == set(as_json.json())
    np.testing.assert_allclose(binary.json()["actions"], as_json.json()["actions"], atol=1e-5)
    follow = _binary_act(served, {**fields, "memory": binary.json()["memory"]}, base64.b64decode(IMAGE))
    assert follow.status_code == 200 and follow.json()["memory_reset"] is False


def test_bad_binary_requests_get_4xx_beside_robots_that_are_served(served):
    frame = base64.b64decode(IMAGE)
    fields = {"instruction": INSTRUCTION, "state": [0.0, 0.0, 0.0]}
    png = io.BytesIO()
    Image.new("RGB", (32, 32)).save(png, format="PNG")
    bad = {  # robot -> (X-Act-Fields or None, body, content type, status, code)
        "bin-bad-truncated": (fields, frame[:1500], "image/jpeg", 400, "invalid_image"),
        "bin-bad-png-as-jpeg": (fields, png.getvalue(), "image/jpeg", 400, "invalid_image"),
        "bin-bad-no-header": (None, frame, "image/jpeg", 400, "missing_fields"),
        "bin-bad-type": (fields, frame, "text/plain", 415, "unsupported_media_type"),
        "bin-bad-field": ({**fields, "state": [0.0, 0.0]}, frame, "image/jpeg", 422, "invalid_request"),
        "bin-bad-huge": (fields, frame + b"\0" * (5 * 1024 * 1024), "image/jpeg", 413, "body_too_large"),
    }

    def act(robot: str) -> httpx.Response:
        if robot not in bad:
            return _binary_act(served, {"robot_id": robot, **fields}, frame)
        header, body, content_type, _, _ = bad[robot]
        return _binary_act(served, None if header is None else {"robot_id": robot, **header}, body, content_type)

    robots = [*bad, *(f"bin-good-{i}" for i in range(6))]
    with ThreadPoolExecutor(len(robots)) as pool:
        answers = dict(zip(robots, pool.map(act, robots), strict=True))
    for robot, answer in answers.items():
        if robot in bad:
            assert (answer.status_code, _error(answer)["code"]) == bad[robot][3:], (robot, answer.text)
        else:
            assert answer.status_code == 200 and answer.headers["x-fallback-reason"] == "none", answer.text
    assert served.http.get("/healthz").status_code == 200
