"""The wire format and the typed answers: frames become JPEG, bodies are HTTP API v1 JSON, answers parse
into dataclasses, and fields the server adds later are read when present."""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from mobile_vla_client import ActResult, Client, ModelSummary, Safety, encode_jpeg, jpeg_base64
from mobile_vla_client.wire import BinaryWire, JsonWire, wire_named


def test_frames_become_jpeg_and_encoded_bytes_pass_through():
    frame = np.full((48, 64, 3), 200, np.uint8)
    jpeg = encode_jpeg(frame, quality=90)
    with Image.open(io.BytesIO(jpeg)) as image:
        assert image.format == "JPEG" and image.size == (64, 48)
        assert np.abs(np.asarray(image, np.int16) - 200).max() <= 2
    assert encode_jpeg(jpeg) == jpeg  # e.g. a ROS CompressedImage's data, sent as it is
    assert encode_jpeg(Image.fromarray(frame)) == encode_jpeg(frame)
    assert base64.b64decode(jpeg_base64(frame, 90)) == jpeg
    with pytest.raises(ValueError, match=r"uint8 \[H, W, 3\]"):
        encode_jpeg(np.zeros((4, 4, 4), np.uint8))


def test_json_wire_puts_the_frame_in_base64_and_refuses_nan():
    content, headers = JsonWire.encode({"robot_id": "r-1", "state": [0.0]}, b"\xff\xd8jpeg")
    assert headers == {"Content-Type": "application/json"}
    body = json.loads(content)
    assert body == {"robot_id": "r-1", "state": [0.0], "image": base64.b64encode(b"\xff\xd8jpeg").decode()}
    with pytest.raises(ValueError):
        JsonWire.encode({"state": [float("nan")]}, None)


def test_answers_are_typed_and_later_fields_are_optional():
    body = {
        "actions": [[0.4, -0.1, 0.2]] * 10,
        "confidence": 0.8,
        "memory": "m2.a.b.c",
        "model": {"name": "mobile-vla-policy", "version": "7"},
        "backend": "onnx-cpu",
        "memory_reset": False,
        "latency_ms": 7.5,
    }
    answer = ActResult.from_body(body, round_trip_ms=12.0)
    assert answer.actions.dtype == np.float64 and answer.actions.shape == (10, 3)
    assert answer.model.version == "7" and answer.anchor_step is None and answer.safety is None
    assert all(type(v) is float for v in answer.action_now)
    safety = {"level": "stop", "reasons": ["low_confidence"], "speed_factor": 0.0, "novelty": None}
    later = ActResult.from_body({**body, "anchor_step": 41, "queue_ms": 3, "safety": safety}, 1.0)
    assert later.anchor_step == 41 and later.queue_ms == 3.0 and later.safety.must_stop
    assert later.safety == Safety("stop", ("low_confidence",), 0.0) and later.safety.raw["novelty"] is None
    assert not Safety.parse({"level": "slow", "reasons": ["novel_frame"], "speed_factor": 0.5}).must_stop
    with pytest.raises(ValueError, match="K x 3"):
        ActResult.from_body({**body, "actions": [[0.1, 0.2]]}, 1.0)
    summary = ModelSummary.from_body({"name": "m", "version": "3", "state_dim": 3, "chunk": 10})
    assert summary.state_input == "previous_command" and summary.chunk == 10


def test_binary_wire_sends_the_frame_bytes_and_the_fields_as_ascii_json():
    jpeg = encode_jpeg(np.full((24, 32, 3), 90, np.uint8))
    fields = {"robot_id": "r-1", "instruction": "à la boîte rouge", "state": [0.0, 1.5], "memory": "m2.a.b.c"}
    content, headers = BinaryWire.encode(fields, jpeg)
    assert content is jpeg  # no copy, no base64
    assert headers["Content-Type"] == "image/jpeg" and headers["X-Act-Fields"].isascii()
    assert json.loads(headers["X-Act-Fields"]) == fields
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    assert BinaryWire.encode(fields, png.getvalue())[1]["Content-Type"] == "image/png"  # named by the bytes
    with pytest.raises(ValueError):
        BinaryWire.encode({"state": [float("inf")]}, jpeg)
    assert BinaryWire.takes("/v1/act") and not BinaryWire.takes("/v1/feedback") and JsonWire.takes("/v1/feedback")
    assert wire_named("binary") is BinaryWire and wire_named("json") is JsonWire
    with pytest.raises(ValueError, match="wire must be one of"):
        wire_named("msgpack")


def test_a_binary_client_sends_act_in_the_binary_form_and_feedback_as_json():
    seen = []

    def server(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.path, request.headers["content-type"], request.headers.get("x-act-fields")))
        if request.url.path == "/v1/feedback":
            assert json.loads(request.read())["image"]  # base64, as the feedback route takes it
            return httpx.Response(202, json={"stored": True, "key": "r-1/ep/0"})
        assert request.read()[:2] == b"\xff\xd8"  # the JPEG itself
        return httpx.Response(200, json=ANSWER)

    with Client("http://server", "token-123", "r-1", wire="binary", transport=httpx.MockTransport(server)) as robot:
        robot.start_episode("go to the red box", episode_id="ep")
        answer = robot.act(np.zeros((16, 16, 3), np.uint8), [0.0, 0.0, 0.0], delay_ms=20)
        robot.act(np.zeros((16, 16, 3), np.uint8), [0.0, 0.0, 0.0])
        robot.feedback(np.zeros((16, 16, 3), np.uint8), [0.0, 0.0, 0.0], answer.action_now)
    (act_path, act_type, first), (_, _, second), (feedback_path, feedback_type, none) = seen
    assert (act_path, act_type, feedback_path, feedback_type, none) == (
        "/v1/act",
        "image/jpeg",
        "/v1/feedback",
        "application/json",
        None,
    )
    assert json.loads(first) == {
        "robot_id": "r-1",
        "instruction": "go to the red box",
        "state": [0.0] * 3,
        "delay_ms": 20.0,
    }
    assert json.loads(second)["memory"] == ANSWER["memory"]  # the token travels in the header
    with pytest.raises(ValueError, match="wire must be one of"):
        Client("http://server", "token-123", "r-1", wire="jpeg2000")


ANSWER = {
    "actions": [[0.1, 0.0, 0.0]] * 4,
    "confidence": 0.9,
    "memory": "m2.k.x.y",
    "model": {"name": "m", "version": "1"},
    "backend": "onnx-cpu",
    "memory_reset": False,
    "latency_ms": 5.0,
}
