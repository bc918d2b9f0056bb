"""Shadow mode on the real Serve app: @challenger gets a copy of each /v1/act off the request path.

The answers must be exactly what the champion alone gives (checked against the champion's ONNX
model run here, without any shadow), and the recorded agreement must match what the two versions
really do on the same inputs (also computed here). The same app has no fallback, which the last
test uses: a robot the primary fails gets its 503 alone.
"""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from tests.serve.conftest import deployed_app, wait_until

APP = "mobile-vla-shadow"
NAME = "mobile-vla-policy"

pytestmark = pytest.mark.slow  # Serve apps with a shadow deployment: minutes on 2 cores
INSTRUCTION = "go to the red box"
STATE = [0.1, 0.0, -0.2]
TOLERANCE = 0.05


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (240, 320, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


FRAMES = [_jpeg(seed) for seed in range(6)]


@pytest.fixture(scope="module")
def shadow_home(tmp_path_factory, use_home, serve_home):
    """v1 @champion and v2 @challenger: copies of the session's exported tiny model, v2 with its action
    range shifted by 0.1 (so the two disagree by a known amount without another ONNX export)."""
    from mobile_vla.serve.auth import create_tokens_file
    from mobile_vla.serve.sample_model import register_version_copy
    from mobile_vla.tracking import resolve_model

    with use_home(serve_home):
        exported = resolve_model(f"models:/{NAME}/1").path
    home = tmp_path_factory.mktemp("shadow-home")
    with use_home(home):
        assert register_version_copy(exported, NAME, alias="champion") == "1"
        assert register_version_copy(exported, NAME, alias="challenger", action_offset=0.1) == "2"
    (home / "token").write_text(create_tokens_file(home / "tokens"))
    return home


@pytest.fixture(scope="module")
def app(ray_cluster, shadow_home):
    from mobile_vla.serve.app import ServeAppConfig, ShadowConfig
    from mobile_vla.serve.drills import DrillConfig

    # No fallback here; drill-error-* robots fail on the primary (test-only fault), everyone else is served.
    args = ServeAppConfig(
        tokens_file=str(shadow_home / "tokens"),
        max_batch_size=8,
        batch_wait_timeout_s=0.01,
        primary_timeout_s=20.0,
        alias_poll_s=0.3,
        shadow=ShadowConfig(tolerance=TOLERANCE),
        deadline_s=30.0,  # a loaded 2-core box: this test is about shadow mode, not latency
    )
    drill = DrillConfig(primary_faults=[{"mode": "error", "robot_prefix": "drill-error-"}])
    with deployed_app(APP, shadow_home, args, drill=drill) as client:
        yield client


def _local_actions(home, version: str, use_home) -> np.ndarray:
    """Each frame from a fresh state through version `version`'s ONNX model, here, no Serve: [N, K, 3]."""
    from mobile_vla.runtime import load_backend
    from mobile_vla.serve.model_side import load_model_side

    with use_home(home):
        uri = f"models:/{NAME}/{version}"
        side = load_model_side(uri)
        backend = load_backend(uri, prefer=("onnx-cpu",))
    out = []
    for frame in FRAMES:
        image = side.prepare_image(Image.open(io.BytesIO(frame)).convert("RGB"))[None]  # [1, H, W, C]
        out.append(np.asarray(backend.predict(image, np.asarray([STATE], np.float32), [INSTRUCTION]).actions[0]))
    return np.stack(out)


def _send_all(app, tag: str) -> np.ndarray:
    """One request per frame, each from a new robot (fresh state on both sides): actions [N, K, 3]."""
    answers = []
    for i, frame in enumerate(FRAMES):
        r = app.act(base64.b64encode(frame).decode(), robot_id=f"{tag}-{i}", instruction=INSTRUCTION, state=STATE)
        assert r.status_code == 200, r.text
        assert r.json()["model"]["version"] == "1"
        answers.append(r.json()["actions"])
    return np.asarray(answers, dtype=np.float32)


def _shadow(app) -> dict:
    return app.model()["shadow"]


def _settled_shadow(app) -> dict:
    """The shadow's counters once every earlier request has been compared (two reads 1 s apart agree)."""
    reads = []

    def settled():
        reads.append(_shadow(app))
        counts = [(r["compared"], r["errors"], r["dropped"]) for r in reads[-2:]]
        return reads[-1] if len(counts) == 2 and counts[0] == counts[1] else None

    return wait_until(settled, 60, every_s=1.0, what="the shadow's earlier comparisons to finish")


def test_shadow_records_agreement_and_never_changes_answers(app, shadow_home, use_home):
    champion = _local_actions(shadow_home, "1", use_home)
    challenger = _local_actions(shadow_home, "2", use_home)
    np.testing.assert_allclose(challenger - champion, 0.1, atol=1e-4)  # the two versions really differ

    start = _settled_shadow(app)  # counters so far (another test's traffic is compared too)
    served = _send_all(app, "a")
    np.testing.assert_allclose(served, champion, atol=1e-4)  # exactly the answers without a shadow
    stats = wait_until(
        lambda: (s := _shadow(app))["compared"] >= start["compared"] + len(FRAMES) and s, 60, what="shadow comparisons"
    )
    assert (stats["alias"], stats["version"]) == ("challenger", "2")
    assert (stats["errors"], stats["dropped"]) == (start["errors"], start["dropped"])
    assert stats["compared"] - start["compared"] == len(FRAMES)
    diff = np.abs(challenger - champion).mean(axis=(1, 2))  # [N]
    agree = np.abs(challenger[:, 0] - champion[:, 0]).max(axis=1) <= TOLERANCE  # [N]
    earlier_sum = (start["mean_abs_action_diff"] or 0.0) * start["compared"]  # None before any comparison
    diff_sum = stats["mean_abs_action_diff"] * stats["compared"] - earlier_sum
    assert diff_sum / len(FRAMES) == pytest.approx(diff.mean(), rel=1e-3, abs=1e-5)
    assert stats["agreed"] - start["agreed"] == int(agree.sum())

    # The shadow follows its alias too: pointed at the champion's own version, everything agrees.
    from mobile_vla.tracking import set_alias

    with use_home(shadow_home):
        set_alias(NAME, "challenger", "1")
    wait_until(lambda: app.policy_info("ShadowPolicy")["model_version"] == "1", 60, what="the shadow swapping to v1")
    before = _shadow(app)
    served_again = _send_all(app, "b")
    np.testing.assert_allclose(served_again, champion, atol=1e-4)
    after = wait_until(
        lambda: (s := _shadow(app))["compared"] >= before["compared"] + len(FRAMES) and s,
        60,
        what="shadow comparisons after the swap",
    )
    assert after["version"] == "1" and after["agreed"] - before["agreed"] == len(FRAMES)
    new_diff_sum = (
        after["mean_abs_action_diff"] * after["compared"] - before["mean_abs_action_diff"] * before["compared"]
    )
    assert abs(new_diff_sum) < 1e-3


def test_without_a_fallback_only_the_robot_that_failed_gets_503(app):
    """One robot the primary fails and three healthy ones in the same batch: only the failing one gets
    503. The burst is sent again until the primary's counters show all four in one call."""
    frame = base64.b64encode(FRAMES[0]).decode()
    robots = ["drill-error-nofallback", "nofallback-0", "nofallback-1", "nofallback-2"]
    calls = []
    for _ in range(10):
        before = app.policy_info("OnnxPolicy")["calls"]
        with ThreadPoolExecutor(len(robots)) as pool:
            answers = list(pool.map(lambda robot: app.act(frame, robot_id=robot, state=STATE), robots))
        failed, served = answers[0], answers[1:]
        assert failed.status_code == 503, failed.text
        assert failed.json() == {"error": {"code": "unavailable", "message": failed.json()["error"]["message"]}}
        assert "no fallback configured" in failed.json()["error"]["message"]
        assert [a.status_code for a in served] == [200, 200, 200]
        calls.append(app.policy_info("OnnxPolicy")["calls"] - before)
        if calls[-1] == 1:
            break  # the four shared one batch
    assert calls[-1] == 1, f"the four robots never shared a batch (primary calls per burst: {calls})"
    assert app.http.get("/healthz").status_code == 200
