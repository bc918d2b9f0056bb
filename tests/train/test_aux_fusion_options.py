"""The training side of the issue-15 model options: loss.aux_weight (auxiliary heads on the simulator
labels: config checks, the labels in the windows, the terms through the step and validation) and the
fusion_pooling override; all without a cluster."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mobile_vla.data.episodes import SCHEMA_VERSION, Episode, write_episode
from mobile_vla.data.manifest import build_manifest
from mobile_vla.errors import ConfigError, DataError
from mobile_vla.policy.config import AUX_LABELS
from mobile_vla.policy.losses import AUX_TERMS, policy_loss
from mobile_vla.policy.model import build_policy
from mobile_vla.policy.preprocessing import Preprocessing
from mobile_vla.policy.presets import tiny
from mobile_vla.policy.text import build_tokenizer
from mobile_vla.train.evaluation import evaluate_windows, model_inputs
from mobile_vla.train.job_config import load_train_config
from mobile_vla.train.preflight import check_data, resolve_policy_config
from mobile_vla.train.step import TrainStep
from mobile_vla.train.windows import WindowDataset
from tests.policy.conftest import build_batch

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "jobs" / "configs" / "tiny.yaml"
CPU = torch.device("cpu")
W, K = 4, 3


def _write(folder: Path, name: str, num_frames: int, labels: bool) -> Episode:
    rng = np.random.default_rng(num_frames)
    actions = rng.uniform(-1, 1, (num_frames, 3)).astype(np.float32)
    extras = {}
    if labels:
        extras = {
            "target_bearing": np.linspace(-1.0, 1.0, num_frames, dtype=np.float32),
            "target_distance": np.linspace(4.0, 0.5, num_frames, dtype=np.float32),
            "target_in_view": (np.arange(num_frames) % 2).astype(np.float32),
        }
    episode = Episode(
        images=rng.integers(0, 256, (num_frames, 224, 224, 3), dtype=np.uint8),
        actions=actions,
        state=np.vstack([np.zeros((1, 3), np.float32), actions[:-1]]),
        attrs={
            "instruction": "go to the red box",
            "episode_id": name,
            "source": "test",
            "success": True,
            "control_hz": 5.0,
            "schema_version": SCHEMA_VERSION,
        },
        extras=extras,
    )
    write_episode(folder / name, episode)
    return episode


def _dataset(folder: Path, labels: bool) -> dict[str, Episode]:
    folder.mkdir(parents=True, exist_ok=True)
    episodes = {"long.h5": _write(folder, "long.h5", 10, labels), "short.h5": _write(folder, "short.h5", 2, labels)}
    build_manifest(folder, {"train": ["long.h5"], "val": ["short.h5"]}, {"kind": "test"})
    return episodes


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("aux")
    return {
        "labelled": (root / "labelled", _dataset(root / "labelled", labels=True)),
        "plain": (root / "plain", _dataset(root / "plain", labels=False)),
    }


@pytest.fixture(scope="module")
def preprocessing():
    config = tiny()
    return Preprocessing(
        action_low=[-1.0] * 3,
        action_high=[1.0] * 3,
        state_mean=[0.0] * 3,
        state_std=[1.0] * 3,
        tokenizer=build_tokenizer(config),
        window=W,
        chunk=K,
    )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("loss.aux_weight=-1", "loss.aux_weight = -1"),
        ("loss.aux_weight=lots", "loss.aux_weight = 'lots'"),
        ("model.overrides.fusion_pooling=cross", "PolicyConfig.fusion_pooling = 'cross'"),
    ],
)
def test_bad_option_values_are_named(override, message):
    with pytest.raises(ConfigError) as info:
        resolve_policy_config(load_train_config(TINY, [override]))
    assert message in str(info.value)


def test_aux_weight_builds_the_heads_and_is_off_by_default():
    cfg = load_train_config(TINY)
    assert cfg.loss.aux_weight == 0.0 and cfg.loss.frame_labels() == ()
    assert resolve_policy_config(cfg).aux_heads is False
    assert resolve_policy_config(cfg).fusion_pooling == "pooled"
    cfg = load_train_config(TINY, ["loss.aux_weight=0.3", "model.overrides.fusion_pooling=text_attention"])
    policy = resolve_policy_config(cfg)
    assert policy.aux_heads is True and policy.fusion_pooling == "text_attention"
    assert cfg.loss.weights()["aux_weight"] == 0.3 and cfg.loss.frame_labels() == AUX_LABELS
    with pytest.raises(ConfigError, match=r"model.overrides.aux_heads = False: loss.aux_weight = 0.3 trains"):
        resolve_policy_config(load_train_config(TINY, ["loss.aux_weight=0.3", "model.overrides.aux_heads=false"]))


def test_preflight_refuses_aux_on_data_without_labels(datasets):
    plain, _ = datasets["plain"]
    labelled, _ = datasets["labelled"]
    check_data(load_train_config(TINY, [f"data.path={plain}"]))  # aux off: the labels are not needed
    with pytest.raises(DataError) as info:
        check_data(load_train_config(TINY, [f"data.path={plain}", "loss.aux_weight=0.5"]))
    message = str(info.value)
    assert "loss.aux_weight = 0.5" in message and "target_bearing, target_distance, target_in_view" in message
    check_data(load_train_config(TINY, [f"data.path={labelled}", "loss.aux_weight=0.5"]))


def test_windows_carry_the_labels_per_frame_when_asked(datasets, preprocessing):
    folder, episodes = datasets["labelled"]
    plain = WindowDataset(folder, "train", preprocessing)
    assert not set(AUX_LABELS) & set(plain[0])  # not asked: not carried
    windows = WindowDataset(folder, "train", preprocessing, frame_labels=AUX_LABELS)
    episode = episodes["long.h5"]
    for window_id, (_, start) in enumerate(windows.index.windows):
        sample = windows[window_id]
        for key in AUX_LABELS:
            assert sample[key].shape == (W,) and sample[key].dtype == np.float32
            np.testing.assert_array_equal(sample[key], episode.extras[key][start : start + W])
    short = WindowDataset(folder, "val", preprocessing, frame_labels=AUX_LABELS)[0]  # 2 frames, padded to W
    np.testing.assert_array_equal(short["target_distance"], [4.0, 0.5, 0.0, 0.0])
    np.testing.assert_array_equal(short["frame_mask"], [1, 1, 0, 0])


def test_windows_name_the_file_and_the_missing_label(datasets, preprocessing):
    folder, _ = datasets["plain"]
    with pytest.raises(DataError, match=r"long.h5: target_bearing, target_distance, target_in_view: missing"):
        WindowDataset(folder, "train", preprocessing, frame_labels=AUX_LABELS)


def test_step_and_validation_report_the_aux_terms(datasets, preprocessing):
    folder, _ = datasets["labelled"]
    config = tiny().replace(window=W, chunk=K, aux_heads=True, fusion_pooling="text_attention")
    torch.manual_seed(0)
    model = build_policy(config, load_pretrained=False).eval()
    windows = WindowDataset(folder, "train", preprocessing, frame_labels=AUX_LABELS)
    batch = {key: torch.as_tensor(np.stack([windows[i][key] for i in range(2)])) for key in windows[0]}
    weights = {"nll_weight": 0.1, "first_step_weight": 1.0, "aux_weight": 0.5}
    with torch.no_grad():
        terms = policy_loss(model(model_inputs(batch)), batch, **weights)
    assert all(float(terms[key]) > 0 for key in AUX_TERMS)

    scored = evaluate_windows(model, [batch], preprocessing, device=CPU, loss_weights=weights)
    assert set(scored.aux_sums) == set(AUX_TERMS)
    for key in AUX_TERMS:
        assert scored.aux_sums[key] / scored.windows == pytest.approx(float(terms[key]), rel=1e-5)
    assert evaluate_windows(model, [batch], preprocessing, device=CPU).aux_sums == {}  # aux off: no terms

    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    result = TrainStep(model, optimizer, device=CPU, loss_weights=weights)(batch)
    assert result.loss == pytest.approx(float(terms["loss"]), rel=1e-5)
    assert result.aux == pytest.approx({key: float(terms[key]) for key in AUX_TERMS}, rel=1e-5)
    assert TrainStep(model, optimizer, device=CPU)(build_batch(config, build_tokenizer(config), 1)).aux is None


def test_small_aux_is_small_with_the_two_options():
    from mobile_vla.config import dump_config

    small = dump_config(load_train_config(REPO / "jobs" / "configs" / "small.yaml"))
    small_aux = dump_config(load_train_config(REPO / "jobs" / "configs" / "small_aux.yaml"))
    assert small_aux["loss"] == {**small["loss"], "aux_weight": 0.1}
    assert small_aux["model"] == {"preset": "small", "overrides": {"fusion_pooling": "text_attention"}}
    assert {k: v for k, v in small_aux.items() if k not in ("loss", "model")} == {
        k: v for k, v in small.items() if k not in ("loss", "model")
    }
    policy = resolve_policy_config(load_train_config(REPO / "jobs" / "configs" / "small_aux.yaml"))
    assert (
        policy.aux_heads
        and policy.fusion_pooling == "text_attention"
        and policy.fusion_dim % policy.attention_heads == 0
    )
