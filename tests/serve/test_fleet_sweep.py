"""Issue 16 on the real Serve app: generated requests (hypothesis) mixed with good robots in the same
batches never yield a 5xx, never move a good robot off the primary and never open the breaker; a
burst past the ingress's limit is shed with 429 + Retry-After and service is normal right after."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.serve.conftest import deployed_app

pytestmark = pytest.mark.slow  # its own Serve app (about a minute on 2 cores) and ~2,300 requests

APP = "mobile-vla-sweep"
GOOD_PER_EXAMPLE = 8
GENERATED_PER_EXAMPLE = 8
EXAMPLES = 128  # x 8 generated requests = 1,024, each sharing its batches with 8 good robots
MAX_PENDING = 48


def _encode(image: Image.Image, fmt: str, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


RNG = np.random.default_rng(16)
NOISE = Image.fromarray(RNG.integers(0, 255, (240, 320, 3), dtype=np.uint8))
GOOD_JPEG = _encode(NOISE, "JPEG", quality=85)
IMAGES = [
    GOOD_JPEG,
    _encode(NOISE, "JPEG", quality=30, progressive=True),
    _encode(NOISE.resize((1280, 720)), "JPEG", quality=70),  # DCT draft path
    _encode(NOISE.resize((16, 12)), "PNG"),  # tiny: decoded inline
    _encode(Image.new("L", (640, 480), 128), "PNG"),  # grey, converted to RGB
    _encode(Image.new("RGBA", (300, 200), (9, 9, 9, 9)), "PNG"),
    _encode(Image.new("1", (4000, 4000)), "PNG"),  # over the pixel budget: 413
    GOOD_JPEG[: len(GOOD_JPEG) // 2],  # truncated
    b"GIF89a" + bytes(64),
    b"",
]
GOOD_IMAGE = base64.b64encode(GOOD_JPEG).decode()

special_floats = st.sampled_from([1e39, -1e39, 3.4028235e38, -3.4e38, 1e300, 1e-45, 0.0, -0.0, 5e-324])
floats = st.one_of(st.floats(allow_nan=False, allow_infinity=False, width=64), special_floats)
texts = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["go to the red box", "", "   ", "\x00", "go " * 200, "🤖 to the box", "go to the red box " * 8]),
)


@st.composite
def images(draw) -> str:
    raw = draw(st.sampled_from(IMAGES))
    if raw and draw(st.booleans()):  # corrupt a byte somewhere
        at = draw(st.integers(0, len(raw) - 1))
        raw = raw[:at] + bytes([draw(st.integers(0, 255))]) + raw[at + 1 :]
    text = base64.b64encode(raw).decode()
    return draw(st.sampled_from([text, text, text[:-3], "%%%" + text, "AAAA"]))


@st.composite
def act_bodies(draw) -> str:
    """A /v1/act body as JSON text: mostly near-valid, one or more fields off in any direction."""
    body = {
        "robot_id": draw(st.one_of(st.from_regex(r"gen-[a-z0-9]{1,8}", fullmatch=True), texts)),
        "instruction": draw(texts),
        "image": draw(images()),
        "state": draw(st.lists(floats, min_size=0, max_size=5)),
    }
    if draw(st.booleans()):
        body["memory"] = draw(st.one_of(texts, st.just("m1.AAAA.BBBB")))
    if draw(st.booleans()):
        body["deadline_ms"] = draw(st.one_of(st.integers(-5, 120_000), st.just(30_000)))
    if draw(st.integers(0, 9)) == 0:
        body[draw(st.sampled_from(["speed", "State", "x"]))] = 1
    text = json.dumps(body)
    if draw(st.integers(0, 19)) == 0:
        text = text.replace("[", "[NaN, ", 1)  # a NaN literal: not JSON
    return text


@pytest.fixture(scope="module")
def sweep_app(ray_cluster, serve_home):
    from mobile_vla.serve.app import ServeAppConfig

    args = ServeAppConfig(
        tokens_file=str(serve_home / "tokens"),
        fallback="onnx",
        max_batch_size=16,
        batch_wait_timeout_s=0.02,
        primary_timeout_s=20.0,  # a loaded box is slow, not broken: only real faults may open the breaker
        breaker_failures=1,  # ... and a single one would
        deadline_s=30.0,
        max_pending_requests=MAX_PENDING,
    )
    with deployed_app(APP, serve_home, args) as client:
        yield client


def _post(app, text: str) -> httpx.Response:
    headers = {**app.auth, "Content-Type": "application/json"}
    return app.http.post("/v1/act", content=text, headers=headers)


def _good(i: int) -> str:
    state = [0.1 * (i % 5), 0.0, -0.1]
    body = {"robot_id": f"good-{i}", "instruction": "go to the red box", "image": GOOD_IMAGE, "state": state}
    return json.dumps(body)


def _primary_breaker(app) -> str:
    return next(b for b in app.model()["backends"] if b["role"] == "primary")["breaker"]


def test_generated_requests_never_harm_good_robots_in_their_batches(sweep_app):
    sent, statuses = [0], {}
    pool = ThreadPoolExecutor(GOOD_PER_EXAMPLE + GENERATED_PER_EXAMPLE)

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.lists(act_bodies(), min_size=GENERATED_PER_EXAMPLE, max_size=GENERATED_PER_EXAMPLE))
    def one_round(generated: list[str]) -> None:
        texts = [_good(i) for i in range(GOOD_PER_EXAMPLE)] + generated
        order = np.random.default_rng(sent[0]).permutation(len(texts))  # interleave good and generated
        answers = dict(zip(order, pool.map(lambda k: _post(sweep_app, texts[k]), order), strict=True))
        sent[0] += len(generated)
        for k, answer in answers.items():
            statuses[answer.status_code] = statuses.get(answer.status_code, 0) + 1
            assert answer.status_code < 500, (texts[k][:300], answer.status_code, answer.text[:300])
            if answer.status_code != 200:  # every refusal is the API's JSON error, whoever answered
                seen = (answer.status_code, dict(answer.headers), answer.text[:300], texts[k][:200])
                assert answer.headers.get("content-type", "").startswith("application/json"), seen
                assert set(answer.json()) == {"error"}, seen
            else:
                assert np.isfinite(np.asarray(answer.json()["actions"])).all()
            if k < GOOD_PER_EXAMPLE:  # a good robot: answered, by the primary
                assert answer.status_code == 200, answer.text[:300]
                assert answer.headers["x-served-by"] == "OnnxPolicy", answer.headers
                assert answer.headers["x-fallback-reason"] == "none", answer.headers

    try:
        one_round()
    finally:
        pool.shutdown()
    assert sent[0] >= EXAMPLES * GENERATED_PER_EXAMPLE, sent
    assert statuses.get(200, 0) > 0 and sum(v for s, v in statuses.items() if 400 <= s < 500) > 0, statuses
    assert _primary_breaker(sweep_app) == "closed"


def test_a_burst_past_the_limit_is_shed_with_retry_after_then_served(sweep_app):
    async def burst() -> list[httpx.Response]:  # all at once, from one event loop
        headers = {**sweep_app.auth, "Content-Type": "application/json"}
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(base_url=sweep_app.url, timeout=120, limits=limits) as client:
            posts = [client.post("/v1/act", content=_good(i), headers=headers) for i in range(6 * MAX_PENDING)]
            return await asyncio.gather(*posts)

    answers = asyncio.run(burst())
    codes = [a.status_code for a in answers]
    assert set(codes) <= {200, 429}, sorted(set(codes))
    shed = [a for a in answers if a.status_code == 429]
    assert shed and codes.count(200) >= MAX_PENDING, (codes.count(200), len(shed))
    for answer in shed:  # ours (error schema) or Serve's own proxy shedding: both say when to come back
        assert int(answer.headers["retry-after"]) >= 1
    after = _post(sweep_app, _good(0))
    assert after.status_code == 200 and after.headers["x-served-by"] == "OnnxPolicy"
    assert _primary_breaker(sweep_app) == "closed"
