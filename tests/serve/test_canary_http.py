"""A canary on the real Serve app (slow): `@canary` at 50% serves the robots whose sticky bucket is below
50 and only those, the same robot on the same version every request; `GET /v1/rollout` shows the
per-version KPIs with the divergence from the champion on mirrored steps (version 2's actions are
version 1's plus 0.1); the controller, with a divergence bound tighter than that, rolls it back and
every robot is answered by the champion again, the audit recording the move as actor "rollout"."""

from __future__ import annotations

import threading

import pytest

from tests.serve.conftest import deployed_app, two_version_home, wait_until
from tests.serve.test_hot_swap import IMAGE

pytestmark = pytest.mark.slow  # its own Serve app: ingress, primary and canary policies

NAME = "mobile-vla-policy"
ROBOTS = [f"robot-{i:02d}" for i in range(12)]


@pytest.fixture(scope="module")
def canary_home(tmp_path_factory, use_home, serve_home):
    from mobile_vla.serve.auth import create_tokens_file

    home = two_version_home(tmp_path_factory.mktemp("canary-home"), use_home, serve_home, NAME)
    (home / "token").write_text(create_tokens_file(home / "tokens"))
    return home


@pytest.fixture(scope="module")
def app(ray_cluster, canary_home):
    from mobile_vla.serve.app import ServeAppConfig
    from mobile_vla.serve.settings import CanaryConfig

    args = ServeAppConfig(
        tokens_file=str(canary_home / "tokens"),
        max_batch_size=4,
        batch_wait_timeout_s=0.01,
        alias_poll_s=0.3,
        deadline_s=30.0,  # a loaded 2-core box: this test is about routing, not latency
        canary=CanaryConfig(mirror_rate=1.0),
    )
    with deployed_app("mobile-vla-canary", canary_home, args) as client:
        yield client


def rollout(app) -> dict:
    answer = app.http.get("/v1/rollout", headers=app.auth)
    assert answer.status_code == 200, answer.text
    return answer.json()


def served_versions(app) -> dict[str, str]:
    out = {}
    for robot in ROBOTS:
        answer = app.act(IMAGE, robot_id=robot)
        assert answer.status_code == 200, answer.text
        out[robot] = answer.json()["model"]["version"]
    return out


def test_canary_is_sticky_by_robot_and_rolled_back_on_a_divergence_breach(app, canary_home, use_home):
    from mobile_vla.serve.canary import on_canary
    from mobile_vla.serve.rollout import HttpKpis, RolloutBounds, RolloutController, RolloutPlan
    from mobile_vla.tracking import alias_history
    from mobile_vla.tracking.rollout import start_canary

    assert rollout(app)["canary"]["active"] is False
    with use_home(canary_home):
        start_canary(NAME, "2", 50, "test: half the fleet")
    wait_until(lambda: rollout(app)["canary"]["active"], 120, every_s=0.5, what="the canary serving version 2")
    expected = {robot: "2" if on_canary(robot, 50) else "1" for robot in ROBOTS}
    assert set(expected.values()) == {"1", "2"}  # these ids fall on both sides of 50
    assert served_versions(app) == expected
    assert served_versions(app) == expected  # sticky: the same version on the next request
    wait_until(lambda: rollout(app)["kpis"].get("2", {}).get("divergence_n", 0) > 0, 30, what="a mirrored step")
    status = rollout(app)
    assert status["kpis"]["2"]["rates"]["divergence"] == pytest.approx(0.1, abs=0.02)  # the versions' offset
    assert status["kpis"]["1"]["answered"] >= sum(v == "1" for v in expected.values())

    stop = threading.Event()

    def drive():
        while not stop.is_set():
            served_versions(app)

    driver = threading.Thread(target=drive, daemon=True)
    driver.start()
    plan = RolloutPlan(
        model=NAME,
        version="2",
        steps=[50],
        hold_s=30,
        poll_s=0.5,
        bounds=RolloutBounds(max_divergence=0.05, min_divergence_samples=3, min_steps=5),
    )
    kpis = HttpKpis(app.url, app.token)
    try:
        with use_home(canary_home):
            # already on @canary at 50%: start_canary records nothing new for the alias, sets the share again
            report = RolloutController(plan, kpis).run()
    finally:
        stop.set()
        driver.join(60)
        kpis.close()
    assert report.outcome == "rolled_back" and "divergence" in report.reason
    wait_until(lambda: not rollout(app)["canary"]["active"], 60, every_s=0.5, what="the canary rolled back")
    assert set(served_versions(app).values()) == {"1"}
    with use_home(canary_home):
        back = alias_history(NAME, "canary")[0]
    assert (back.from_version, back.to_version, back.actor) == ("2", "1", "rollout")
    assert "divergence" in back.reason
