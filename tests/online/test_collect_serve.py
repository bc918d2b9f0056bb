"""One DAgger round through the fleet path, every part real: `mobile-vla serve`'s app on the shared Ray
cluster drives MiniWorld scenes over /v1/act, the scripted expert's labels go in as operator corrections
over /v1/feedback, `online-update` fine-tunes @champion on them, gates and promotes, and serving moves
to the new version, whose error on the corrected steps is lower."""

from __future__ import annotations

from pathlib import Path

import pytest

from mobile_vla.online.collect import collect
from mobile_vla.online.feedback_store import FeedbackStore
from mobile_vla.online.update import load_update_config, run_online_update
from tests.serve.conftest import deployed_app, home_env, wait_until

pytestmark = pytest.mark.slow  # a Serve app, MiniWorld over HTTP, a fine-tune and an ONNX export: minutes

APP = "mobile-vla-dagger"
NAME = "mobile-vla-policy"
EPISODES = 8
SHIPPED_CONFIG = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "online_update.yaml"


@pytest.fixture(scope="module")
def dagger_home(tmp_path_factory, exported_dir):
    """A platform home whose @champion (v1) is a random tiny policy exported to ONNX (the session's
    export, registered as a copy: a fresh export and calibration cost a minute), and an API token."""
    from mobile_vla.serve.auth import create_tokens_file
    from mobile_vla.serve.sample_model import register_version_copy

    home = tmp_path_factory.mktemp("dagger-home")
    with home_env(home):
        assert register_version_copy(exported_dir, NAME, alias="champion") == "1"
    (home / "token").write_text(create_tokens_file(home / "tokens"))
    return home


def test_a_dagger_round_through_serve_feedback_update_and_gate(ray_cluster, dagger_home, tmp_path):
    from mobile_vla.serve.app import ServeAppConfig

    args = ServeAppConfig(
        tokens_file=str(dagger_home / "tokens"),
        feedback_dir=str(dagger_home / "feedback"),
        primary_timeout_s=20.0,
        alias_poll_s=0.3,
        deadline_s=30.0,  # a loaded 2-core box: this test is about the DAgger round, not latency
    )
    with deployed_app(APP, dagger_home, args) as served:
        assert served.model()["version"] == "1"
        report = collect(
            None,
            EPISODES,
            beta=0.5,
            endpoint=served.url,
            token=served.token,
            seed=2,
            max_steps=12,
            episodes_per_task=EPISODES,
            run_tag="serve",
            progress=False,
        )
        print(report.summary())  # shown with -s
        assert report.model_version.startswith(f"{NAME}/1 ")  # the served champion drove
        records = [r.meta for r in FeedbackStore(dagger_home / "feedback", repair=False).replay()]
        assert len(records) == report.corrections == report.steps > 0
        assert {r["model"]["version"] for r in records} == {"1"}  # the route stamped who drove
        assert all(r["action_corrected"] is not None for r in records)
        assert sum(r["episode_done"] for r in records) == EPISODES
        assert 0 < report.learner_steps < report.steps

        overrides = [
            f"model={NAME}",
            f"workdir={tmp_path / 'update'}",
            f"feedback.root={dagger_home / 'feedback'}",
            "feedback.min_new_episodes=4",
            "finetune.steps=40",
            "finetune.batch_size=4",
            "finetune.lr=3e-3",
            "finetune.augment=false",
            "finetune.trainable=policy_head",
            "finetune.device=cpu",
            "gate.max_offline_mae_regression=null",  # no replay dataset here: the gate reads corrected_mae
        ]
        with home_env(dagger_home):
            update = run_online_update(load_update_config(SHIPPED_CONFIG, overrides))
        print(update.summary())
        before, after = update.metrics["champion"], update.metrics["challenger"]
        assert after["online.corrected_mae"] < 0.95 * before["online.corrected_mae"], update.summary()
        assert update.status == "promoted" and update.challenger_version == "2", update.summary()

        # Serving follows @champion to the fine-tuned version (exported to ONNX by the update).
        wait_until(lambda: served.model()["version"] == "2", timeout_s=120, what="serving v2")
        again = collect(
            None, 1, endpoint=served.url, token=served.token, seed=3, max_steps=3, run_tag="after", progress=False
        )
        assert again.model_version.startswith(f"{NAME}/2 ")
