"""`state_input: measured_velocity` from data to model contract: training windows build the state from the
episodes' `measured_velocity` array (the velocity the base realised at the previous step), the saved
preprocessing and the signature record which state the model expects, and a dataset without the
array is refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mobile_vla.data.episodes import SCHEMA_VERSION, Episode, read_episode, write_episode
from mobile_vla.data.manifest import build_manifest
from mobile_vla.errors import ConfigError, DataError, ModelError
from mobile_vla.export.onnx_export import describe_policy
from mobile_vla.export.signature import PreprocessingSpec
from mobile_vla.policy import build_policy, presets
from mobile_vla.policy.config import MEASURED_VELOCITY, PREVIOUS_COMMAND
from mobile_vla.policy.preprocessing import Preprocessing
from mobile_vla.policy.text import build_tokenizer
from mobile_vla.train.job_config import load_train_config
from mobile_vla.train.preflight import resolve_policy_config
from mobile_vla.train.windows import WindowDataset, episode_state

REPO = Path(__file__).resolve().parents[2]

W, K, N = 4, 3, 9
REFUSED = 4  # the move after frame 4 is refused: the base realises no translation, only the turn


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(presets.tiny())


def frames_and_commands(seed: int):
    rng = np.random.default_rng(seed)
    executed = rng.uniform(-0.5, 0.5, (N, 3)).astype(np.float32)  # [N, 3] the command after each frame
    executed[-1] = 0.0
    measured = executed.copy()
    measured[REFUSED, :2] = 0.0  # [N, 3] what the base realised
    images = rng.integers(0, 256, (N, 224, 224, 3), dtype=np.uint8)
    return images, executed, measured


def attrs(name: str, source: str = "miniworld") -> dict:
    return {
        "instruction": "go to the red box",
        "episode_id": name,
        "source": source,
        "success": True,
        "control_hz": 5.0,
        "schema_version": SCHEMA_VERSION,
    }


def write(folder, name: str, seed: int, with_measured: bool = True, source: str = "miniworld") -> Episode:
    images, executed, measured = frames_and_commands(seed)
    previous_command = np.vstack([np.zeros((1, 3), np.float32), executed[:-1]])  # [N, 3]
    extras = {"executed": executed, MEASURED_VELOCITY: measured} if with_measured else {"executed": executed}
    episode = Episode(images, executed, previous_command, attrs(name, source), extras=extras)
    write_episode(folder / name, episode)
    return episode


def preprocessing(manifest, tokenizer, state_input: str) -> Preprocessing:
    return Preprocessing.from_manifest(manifest, tokenizer, window=W, chunk=K, state_input=state_input)


@pytest.fixture(scope="module")
def measured_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("measured")
    episodes = {name: write(folder, name, seed) for seed, name in enumerate(["a.h5", "b.h5"])}
    manifest = build_manifest(folder, {"train": list(episodes)}, {"kind": "test"})
    return folder, episodes, manifest


def test_manifest_lists_measured_velocity_and_the_file_keeps_it(measured_data):
    folder, episodes, manifest = measured_data
    assert MEASURED_VELOCITY in manifest["frame_keys"]
    again = read_episode(folder / "a.h5", load_images=False)
    np.testing.assert_array_equal(again.extras[MEASURED_VELOCITY], episodes["a.h5"].extras[MEASURED_VELOCITY])


def test_measured_state_is_the_velocity_realised_at_the_previous_step(measured_data, tokenizer):
    folder, episodes, manifest = measured_data
    pre = preprocessing(manifest, tokenizer, MEASURED_VELOCITY)
    ds = WindowDataset(folder, "train", pre, stride=W)
    episode = episodes["a.h5"]
    realised = episode.extras[MEASURED_VELOCITY]
    expected = np.vstack([np.zeros((1, 3), np.float32), realised[:-1]])  # [N, 3] state[t] = realised[t - 1]
    window = ds[1]  # a.h5 frames 4..7: frame 5 follows the refused move
    np.testing.assert_allclose(window["state"], pre.normalise_state(expected[4:8]))
    raw = episode_state(episode, pre, "a.h5")
    assert raw[REFUSED + 1, :2].tolist() == [0.0, 0.0]  # the stuck robot reads "not moving"
    assert raw[REFUSED + 1, 2] == episode.extras["executed"][REFUSED, 2]  # but it did turn
    assert raw[0].tolist() == [0.0, 0.0, 0.0]  # an episode starts from rest

    previous = WindowDataset(folder, "train", preprocessing(manifest, tokenizer, PREVIOUS_COMMAND), stride=W)[1]
    assert not np.allclose(previous["state"], window["state"])  # the old state says it still pushes
    np.testing.assert_allclose(previous["state"], pre.normalise_state(episode.state[4:8]))


def test_a_dataset_without_measured_velocity_is_refused_by_name(tmp_path, tokenizer):
    write(tmp_path, "old.h5", 0, with_measured=False)
    manifest = build_manifest(tmp_path, {"train": ["old.h5"]}, {"kind": "test"})
    assert MEASURED_VELOCITY not in manifest["frame_keys"]
    WindowDataset(tmp_path, "train", preprocessing(manifest, tokenizer, PREVIOUS_COMMAND))  # the old state works
    with pytest.raises(DataError, match=r"old\.h5: measured_velocity: missing, but the model's state_input"):
        WindowDataset(tmp_path, "train", preprocessing(manifest, tokenizer, MEASURED_VELOCITY))


def test_feedback_episodes_keep_the_state_the_robots_sent(tmp_path, tokenizer):
    sent = write(tmp_path, "fb.h5", 3, with_measured=False, source="feedback")
    manifest = build_manifest(tmp_path, {"train": ["fb.h5"]}, {"kind": "test"})
    pre = preprocessing(manifest, tokenizer, MEASURED_VELOCITY)
    np.testing.assert_array_equal(episode_state(sent, pre, "fb.h5"), sent.state)


def test_preprocessing_saves_the_state_input_and_refuses_unknown_ones(measured_data, tokenizer, tmp_path):
    _, _, manifest = measured_data
    pre = preprocessing(manifest, tokenizer, MEASURED_VELOCITY)
    loaded = Preprocessing.load(pre.save(tmp_path / "pre"), with_tokenizer=False)
    assert loaded.state_input == MEASURED_VELOCITY
    saved = json.loads((tmp_path / "pre" / "preprocessing.json").read_text())
    del saved["state_input"]  # a model saved before the field existed
    (tmp_path / "pre" / "preprocessing.json").write_text(json.dumps(saved))
    assert Preprocessing.load(tmp_path / "pre", with_tokenizer=False).state_input == PREVIOUS_COMMAND
    with pytest.raises(ConfigError, match=r"Preprocessing.state_input = 'odometry': expected one of"):
        preprocessing(manifest, tokenizer, "odometry")


def test_the_signature_tells_robots_which_state_to_send(measured_data, tokenizer):
    _, _, manifest = measured_data
    config = presets.tiny().replace(state_input=MEASURED_VELOCITY)
    model = build_policy(config)
    pre = Preprocessing.from_manifest(
        manifest, tokenizer, window=config.window, chunk=config.chunk, state_input=MEASURED_VELOCITY
    )
    assert describe_policy(model, pre).preprocessing.state_input == MEASURED_VELOCITY
    pre.state_input = PREVIOUS_COMMAND
    with pytest.raises(ModelError, match="state_input 'previous_command' does not match the policy config's"):
        describe_policy(model, pre)
    ignoring = build_policy(presets.tiny().replace(state_input="none"))  # saved before the field: harmless
    assert describe_policy(ignoring, pre).preprocessing.state_input == PREVIOUS_COMMAND

    spec = describe_policy(build_policy(presets.tiny()), pre).preprocessing.model_dump()
    assert spec["state_input"] == PREVIOUS_COMMAND
    del spec["state_input"]  # a signature.json written before the field existed
    assert PreprocessingSpec.model_validate(spec).state_input == PREVIOUS_COMMAND
    with pytest.raises(ValueError, match="'odometry': expected one of"):
        PreprocessingSpec.model_validate({**spec, "state_input": "odometry"})


def test_small_measured_is_small_with_the_measured_state():
    measured = load_train_config(REPO / "jobs/configs/small_measured.yaml")
    small = load_train_config(REPO / "jobs/configs/small.yaml")
    assert resolve_policy_config(measured) == resolve_policy_config(small).replace(state_input=MEASURED_VELOCITY)
    assert measured.model_dump(exclude={"model"}) == small.model_dump(exclude={"model"})


@pytest.mark.slow  # one real Ray Train run (shared with the aux and recipe tests) and a short closed loop
def test_tiny_end_to_end_trains_and_drives_with_the_measured_state(options_home):
    """The shared options run of tests/train/conftest.py trained with the measured-velocity state."""
    from mobile_vla.evaluate.closed_loop import evaluate_closed_loop
    from mobile_vla.policy import load_policy

    cfg, result = options_home.cfg, options_home.result
    assert cfg.model.overrides["state_input"] == MEASURED_VELOCITY
    model, pre = load_policy(result.best_checkpoint_dir / "policy")
    assert model.config.state_input == pre.state_input == MEASURED_VELOCITY  # saved with the model
    assert describe_policy(model, pre).preprocessing.state_input == MEASURED_VELOCITY  # what robots are told

    report = evaluate_closed_loop(
        f"models:/mobile-vla-policy/{result.model_version}", "val", 1, max_steps=4, record_frames=0, progress=False
    )
    assert report.settings["state_input"] == MEASURED_VELOCITY and report.policy.episodes == 1
