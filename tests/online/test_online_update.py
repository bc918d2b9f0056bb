"""The online update end to end on real components: a deliberately degraded champion in a real MLflow
registry, operator corrections stored through the real feedback WAL, the real tiny policy fine-tuned,
the real gate. The degraded champion is a broken release that always steers right; this week's robots
were sent left ("... on the left"), and operators corrected every step. The update must learn the
correction from the feedback and only then take over."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest

from mobile_vla.errors import ConfigError, DataError

MODEL = "online-test"
FRAMES = 6
TURN = {"red": 0.5, "blue": -0.5}
INSTRUCTION = {"red": "go to the red box on the left", "blue": "go to the blue box on the right"}


def frame(colour: str, step: int) -> np.ndarray:
    rng = np.random.default_rng(step + (0 if colour == "red" else 100))
    image = rng.integers(0, 40, (224, 224, 3), dtype=np.uint8)
    image[..., 0 if colour == "red" else 2] += 180
    return image


def expert_action(colour: str) -> list[float]:
    return [0.3, 0.0, TURN[colour]]


def jpeg(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_original_dataset(folder: Path) -> dict:
    """The expert data the champion line was trained on: same rule, a few episodes per colour."""
    from mobile_vla.data.episodes import SCHEMA_VERSION, Episode, write_episode
    from mobile_vla.data.manifest import build_manifest

    names = []
    for i, colour in enumerate(["red", "blue", "red", "blue", "red", "blue"]):
        images = np.stack([frame(colour, 10 * i + t) for t in range(FRAMES)])
        actions = np.tile(np.array(expert_action(colour), np.float32), (FRAMES, 1))
        attrs = {
            "instruction": INSTRUCTION[colour],
            "episode_id": f"orig-{i}",
            "source": "test",
            "success": True,
            "control_hz": 5.0,
            "schema_version": SCHEMA_VERSION,
        }
        write_episode(folder / f"orig_{i}.h5", Episode(images, actions, np.zeros((FRAMES, 3), np.float32), attrs))
        names.append(f"orig_{i}.h5")
    return build_manifest(folder, {"train": names[:4], "val": names[4:]}, generator={"kind": "test"})


def register_degraded_champion(tmp_path: Path, manifest: dict) -> str:
    """A release with a steering bug: its head's angular-velocity bias drives hard right on every frame."""
    import mlflow
    import torch

    from mobile_vla import tracking
    from mobile_vla.policy import build_policy, presets, save_policy
    from mobile_vla.policy.preprocessing import Preprocessing
    from mobile_vla.policy.text import build_tokenizer
    from mobile_vla.tracking.lifecycle import promote

    config = dataclasses.replace(presets.tiny(), window=2, chunk=2)
    torch.manual_seed(0)
    model = build_policy(config)
    with torch.no_grad():  # head output = (mean, log_var) x K x 3: bias the mean of angular_z on every k
        model.head[-1].bias[2 : 3 * config.chunk : 3] = -1.5  # tanh(-1.5) = -0.9 of the range: hard right
    pre = Preprocessing.from_manifest(manifest, build_tokenizer(config), window=2, chunk=2)
    save_policy(tmp_path / "champion" / "policy", model, pre)
    with mlflow.start_run(experiment_id=tracking.get_or_create_experiment("online-test")) as run:
        pass
    version = tracking.register_policy(tmp_path / "champion", run.info.run_id, name=MODEL, alias=None)
    from mobile_vla.tracking.lifecycle import GateConfig

    promote(
        MODEL, version=version, gate=GateConfig(require_closed_loop=False, max_offline_mae_regression=None), force=True
    )
    return version


def send_feedback(root: Path, episodes: int) -> None:
    """What robots report: sent left, the champion turned right; the operator corrected every step."""
    from mobile_vla.online.feedback_store import FeedbackStore

    store = FeedbackStore(root)
    for e in range(episodes):
        colour = "red"
        for step in range(FRAMES):
            store.append(
                {
                    "robot_id": f"robot-{e % 3}",
                    "episode_id": f"ep-{e}",
                    "step": step,
                    "instruction": INSTRUCTION[colour],
                    "image": jpeg(frame(colour, 1000 + 10 * e + step)),
                    "state": [0.0, 0.0, 0.0],
                    "action_executed": [0.3, 0.0, -0.45],
                    "action_corrected": expert_action(colour),
                    "intervention": False,
                    "episode_done": step == FRAMES - 1,
                    "success": True if step == FRAMES - 1 else None,
                    "model_version": "1",
                }
            )
    store.close()


WORDY = "go to the red box on the left " * 40  # more Kosmos-2 tokens than the tiny model takes


def send_wordy_episode(root: Path) -> None:
    """One robot's episode whose instruction the champion's tokenizer refuses: it must not block updates."""
    from mobile_vla.online.feedback_store import FeedbackStore

    with FeedbackStore(root) as store:
        for step in range(2):
            store.append(
                {
                    "robot_id": "robot-wordy",
                    "episode_id": "ep-0",
                    "step": step,
                    "instruction": WORDY,
                    "image": jpeg(frame("red", step)),
                    "state": [0.0, 0.0, 0.0],
                    "action_executed": [0.3, 0.0, 0.0],
                    "episode_done": step == 1,
                }
            )


@pytest.fixture()
def online_setup(platform_home, tmp_path):
    manifest = write_original_dataset(tmp_path / "original")
    champion = register_degraded_champion(tmp_path, manifest)
    send_feedback(platform_home / "feedback", episodes=8)
    send_wordy_episode(platform_home / "feedback")
    return tmp_path, champion


SHIPPED_CONFIG = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "online_update.yaml"


def update_overrides(tmp_path: Path, *overrides: str) -> list[str]:
    """The shipped config's overrides for these tests: the test champion, a small quick fine-tune."""
    return [
        f"model={MODEL}",
        f"replay.data={tmp_path / 'original'}",
        "feedback.min_new_episodes=4",
        "feedback.holdout_fraction=0.25",
        "finetune.batch_size=4",
        "finetune.lr=3e-3",
        "finetune.augment=false",
        "finetune.trainable=policy_head",
        "finetune.device=cpu",
        *overrides,
    ]


def update_config(tmp_path: Path, *overrides: str):
    from mobile_vla.online.update import load_update_config

    return load_update_config(SHIPPED_CONFIG, update_overrides(tmp_path, *overrides))


@pytest.mark.slow  # two fine-tunes, exports and gate evaluations: ~20 s on a loaded 2-core box
def test_online_update_learns_corrections_and_takes_over_only_through_the_gate(online_setup, capsys):
    from mobile_vla import tracking
    from mobile_vla.cli import main
    from mobile_vla.online.feedback_store import FeedbackStore
    from mobile_vla.online.update import run_online_update

    tmp_path, champion = online_setup
    root = tmp_path / "home" / "feedback"

    # A one-step update (`mobile-vla online-update`, as documented) cannot have learned the rule: the gate
    # refuses it (exit status 1) and the feedback stays pending.
    overrides = update_overrides(tmp_path, "finetune.steps=1", f"workdir={tmp_path / 'u1'}")
    assert main(["online-update", "--config", str(SHIPPED_CONFIG), *overrides]) == 1
    printed = capsys.readouterr().out
    assert "online update: rejected (champion v1, challenger v2" in printed
    assert "online.corrected_mae" in next(line for line in printed.splitlines() if line.strip().startswith("gate:"))
    assert tracking.get_version_by_alias(MODEL, "champion") == champion
    assert "quarantined 1 episodes" in printed and "robot-wordy/ep-0" in printed and "tokens" in printed
    store = FeedbackStore(root)  # the cursor consumed the quarantined episode alone: the rest waits
    assert sorted(store.pending_episodes(store.load_cursor())) == sorted(f"robot-{e % 3}/ep-{e}" for e in range(8))
    assert (root / "quarantine" / "episodes" / "robot-wordy_ep-0.json").is_file()

    report = run_online_update(update_config(tmp_path, "finetune.steps=30", f"workdir={tmp_path / 'u2'}"))
    print(report.summary())  # shown with -s: the before/after numbers
    before, after = report.metrics["champion"], report.metrics["challenger"]
    assert report.feedback_episodes == 8  # the rejected update's episodes came back
    assert after["online.corrected_mae"] < 0.6 * before["online.corrected_mae"], report.summary()
    assert report.status == "promoted", report.summary()
    assert tracking.get_version_by_alias(MODEL, "champion") == report.challenger_version
    tags = tracking.get_version_tags(MODEL, report.challenger_version)
    assert tags["promotion.decision"] == "promoted" and tags["promotion.compared_to"] == champion
    assert tags["online.parent_version"] == champion
    assert float(tags["metric.online.corrected_mae"]) == pytest.approx(after["online.corrected_mae"], rel=1e-4)

    # The new champion, loaded as serving would, now steers left where it was corrected (frames it never saw).
    from mobile_vla.policy import load_policy

    model, pre = load_policy(tracking.resolve_model(f"models:/{MODEL}@champion").path / "policy")
    actions, _, _ = model.step(
        frame("red", 5000)[None], np.zeros((1, 3), np.float32), pre.tokenize([INSTRUCTION["red"]])
    )
    assert pre.denormalise_actions(actions.detach().numpy())[0, 0, 2] > 0.0  # angular_z: left

    # The watermark moved: nothing new, no model.
    assert run_online_update(update_config(tmp_path, f"workdir={tmp_path / 'u3'}")).status == "no_new_feedback"
    assert json.loads((root / "cursor.json").read_text())["history"][-1]["decision"] == "promoted"


def test_online_update_refuses_bad_input_clearly(platform_home, tmp_path, capsys):
    from mobile_vla.cli import main
    from mobile_vla.online.update import run_online_update

    with pytest.raises(DataError, match="no feedback segments"):
        run_online_update(update_config(tmp_path, f"feedback.root={tmp_path / 'nowhere'}"))
    send_feedback(platform_home / "feedback", episodes=1)
    with pytest.raises(ConfigError, match="no champion to fine-tune"):
        run_online_update(update_config(tmp_path))
    assert main(["online-update", "--config", str(SHIPPED_CONFIG), "finetune.steps=0"]) == 2
    assert "finetune.steps = 0" in capsys.readouterr().err


def test_online_update_as_a_ray_job_refuses_to_keep_its_work_in_the_working_dir_copy(tmp_path, monkeypatch, capsys):
    from mobile_vla.cli import main
    from mobile_vla.tracking.job_storage import JOB_CONFIG_ENV

    copy = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"  # Ray's copy of the upload
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.delenv("MOBILE_VLA_HOME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv(JOB_CONFIG_ENV, json.dumps({"metadata": {"job_submission_id": "raysubmit_x"}}))
    assert main(["online-update", "--config", str(SHIPPED_CONFIG)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mobile-vla online-update: error: Ray job raysubmit_x: the MLflow store")
    assert "workdir .mobile_vla/online_updates (MOBILE_VLA_HOME, unset) would be written inside Ray's" in err
    assert f"temporary copy of the job's working dir, {copy}," in err
