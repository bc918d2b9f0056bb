"""Issue 16, the pure parts of the request path: float32-range checks at the edge, the admission gate,
Serve's limits in front of the ingress, step budgets, the Retry-After header and the image decode
budgets (pixels, scans, DCT draft, thread)."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from mobile_vla.serve import app as serve_app
from mobile_vla.serve.admission import AdmissionGate, step_budget_s
from mobile_vla.serve.auth import create_tokens_file
from mobile_vla.serve.errors_http import ApiError, retry_after
from mobile_vla.serve.request_checks import MAX_JPEG_SCANS, decode_image
from mobile_vla.serve.schemas import FLOAT32_MAX, ActRequest, FeedbackRequest
from mobile_vla.serve.settings import INGRESS_OTHER_REQUESTS, ingress_limits

ACT = {"robot_id": "r-1", "instruction": "go to the red box", "image": "AAAA", "state": [0.0, 0.0, 0.0]}
FEEDBACK = {
    **ACT,
    "episode_id": "ep-1",
    "step": 0,
    "action_executed": [0.1, 0.0, 0.0],
}


@pytest.mark.parametrize(
    ("model", "body", "field"),
    [
        (ActRequest, {**ACT, "state": [1e39, 0.0, 0.0]}, "state.0"),
        (ActRequest, {**ACT, "state": [0.0, -3.5e38, 0.0]}, "state.1"),
        (FeedbackRequest, {**FEEDBACK, "state": [0.0, 0.0, 1e39]}, "state.2"),
        (FeedbackRequest, {**FEEDBACK, "action_executed": [1e39, 0.0, 0.0]}, "action_executed.0"),
        (FeedbackRequest, {**FEEDBACK, "action_corrected": [0.0, 0.0, -1e300]}, "action_corrected.2"),
    ],
)
def test_a_float_outside_float32_is_refused_naming_the_field(model, body, field):
    # finite as a Python float, inf once the model sees it as float32
    with pytest.raises(ValidationError) as refused:
        model.model_validate(body)
    [error] = refused.value.errors()
    assert ".".join(map(str, error["loc"])) == field and "float32" in error["msg"]


def test_float32_extremes_themselves_are_accepted():
    assert ActRequest.model_validate({**ACT, "state": [FLOAT32_MAX, -FLOAT32_MAX, 1e-45]}).state[0] == FLOAT32_MAX


def test_deadline_ms_is_bounded():
    assert ActRequest.model_validate({**ACT, "deadline_ms": 150}).deadline_ms == 150
    for bad in (0, -5, 60_001):
        with pytest.raises(ValidationError):
            ActRequest.model_validate({**ACT, "deadline_ms": bad})


def test_the_gate_sheds_past_its_limit_with_retry_after_and_frees_slots():
    gate = AdmissionGate(limit=2, retry_after_s=0.2)
    with gate.admit(), gate.admit():
        with pytest.raises(ApiError) as shed:
            with gate.admit():
                pass
        assert (shed.value.status, shed.value.code) == (429, "overloaded")
        assert shed.value.headers == {"Retry-After": "1"}  # whole seconds, never 0
    assert gate.inside == 0 and gate.shed == 1
    with pytest.raises(RuntimeError), gate.admit():  # a failing request still leaves
        raise RuntimeError("boom")
    assert gate.inside == 0
    with pytest.raises(ValueError):
        AdmissionGate(limit=0, retry_after_s=1)


@pytest.mark.parametrize(
    ("args", "ongoing", "queued"),
    [
        ({}, 2 * 4 + 8, 2 * 4),
        ({"max_pending_requests": 3}, 3 + 8, 3),
        ({"ingress_max_queued_requests": 5}, 2 * 4 + 8, 5),
    ],
)
def test_serve_admits_to_the_ingress_what_its_gate_admits(tmp_path, monkeypatch, args, ongoing, queued):
    # Serve's own limits shed the excess before the ingress's code runs (no 256-deep queue in front of
    # the gate, where admitted requests waited seconds under a 10x overload)
    monkeypatch.setenv("MOBILE_VLA_HOME", str(tmp_path))
    monkeypatch.setattr(
        serve_app, "resolve_model", lambda uri: SimpleNamespace(name="m", version="1", alias="champion", path=tmp_path)
    )
    create_tokens_file(tmp_path / "tokens")
    app = serve_app.build_app(
        {"model_uri": "models:/m@champion", "tokens_file": str(tmp_path / "tokens"), "max_batch_size": 4, **args}
    )
    ingress = app._bound_deployment
    assert ingress.name == "PolicyIngress"
    config = ingress._deployment_config
    assert (config.max_ongoing_requests, config.max_queued_requests) == (ongoing, queued)
    assert config.backpressure_config.status_code == 429 and config.backpressure_config.retry_after_s == 1.0
    assert ingress_limits(args.get("max_pending_requests"), 4)[0] == ongoing - INGRESS_OTHER_REQUESTS


def test_step_budget_request_then_app_then_control_period():
    assert step_budget_s(150, 2.0, 5.0) == pytest.approx(0.15)
    assert step_budget_s(None, 2.0, 5.0) == 2.0
    assert step_budget_s(None, None, 5.0) == pytest.approx(0.2)
    assert retry_after(2.01) == {"Retry-After": "3"}


# -- decode budgets -----------------------------------------------------------------------------------
def _b64(image: Image.Image, **save) -> str:
    buffer = io.BytesIO()
    image.save(buffer, **save)
    return base64.b64encode(buffer.getvalue()).decode()


class _Recorder:
    """Stands in for the saved preprocessing's prepare_image: records what it was given and where."""

    def __init__(self):
        self.sizes, self.threads = [], []

    def __call__(self, image: Image.Image) -> np.ndarray:
        self.sizes.append(image.size)
        self.threads.append(threading.current_thread() is threading.main_thread())
        return np.zeros((224, 224, 3), np.uint8)


def _decode(text: str, max_pixels: int = 2048 * 2048) -> _Recorder:
    recorder = _Recorder()
    asyncio.run(decode_image(text, max_pixels, recorder))
    return recorder


def test_a_large_jpeg_is_decoded_at_a_reduced_dct_scale_in_a_thread():
    frame = Image.fromarray(np.random.default_rng(0).integers(0, 255, (1080, 1920, 3), dtype=np.uint8))
    recorder = _decode(_b64(frame, format="JPEG", quality=80))
    [(width, height)] = recorder.sizes
    assert (width, height) == (480, 270)  # 1/4 scale: still >= 224 on both sides, 1/16 of the pixels decoded
    assert recorder.threads == [False]  # off the event loop's thread


def test_frames_up_to_a_half_scale_vga_decode_on_the_event_loop_larger_ones_in_a_thread():
    # a thread hop costs as much as decoding the API's frame, and spreads a batch's arrivals (request_checks)
    assert _decode(_b64(Image.new("RGB", (224, 224)), format="PNG")).threads == [True]
    vga = _decode(_b64(Image.new("RGB", (640, 480)), format="JPEG"))
    assert vga.sizes == [(320, 240)] and vga.threads == [True]  # decoded at half scale: 76,800 pixels
    assert _decode(_b64(Image.new("RGB", (640, 480)), format="PNG")).threads == [False]  # no DCT scaling for PNG


def test_pixel_budget_is_checked_from_the_header_before_decoding():
    flat = _b64(Image.new("1", (3000, 3000)), format="PNG")  # a few KB that would decode to 27 MB RGB
    assert len(flat) < 10_000
    with pytest.raises(ApiError) as refused:
        _decode(flat, max_pixels=2048 * 2048)
    assert refused.value.status == 413 and "3000x3000" in refused.value.message


def test_a_jpeg_with_too_many_progressive_scans_is_refused_before_decoding():
    frame = Image.fromarray(np.random.default_rng(1).integers(0, 255, (240, 320, 3), dtype=np.uint8))
    normal = base64.b64decode(_b64(frame, format="JPEG", progressive=True))
    assert 1 < normal.count(b"\xff\xda") <= MAX_JPEG_SCANS
    _decode(base64.b64encode(normal).decode())  # an ordinary progressive JPEG is fine
    # the same JPEG with its scans repeated: each is a valid (refining) scan header the decoder would run
    head, first_scan = normal.index(b"\xff\xda"), normal.rindex(b"\xff\xda")
    bomb = normal[:head] + normal[head:first_scan] * 10 + normal[first_scan:]
    assert bomb.count(b"\xff\xda") > MAX_JPEG_SCANS
    with pytest.raises(ApiError) as refused:
        _decode(base64.b64encode(bomb).decode())
    assert refused.value.status == 413 and "scans" in refused.value.message
