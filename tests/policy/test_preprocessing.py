"""Preprocessing: the resize rule, action/state scaling, tokenisation, save/load and pickling."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
from PIL import Image

from mobile_vla.errors import ConfigError, DataError, ModelError
from mobile_vla.policy.preprocessing import PREPROCESSING_FILE, Preprocessing, resize_frame


@pytest.fixture(scope="module")
def tokenizer():
    from mobile_vla.policy import presets
    from mobile_vla.policy.text import build_tokenizer

    return build_tokenizer(presets.tiny())


def make(**changes) -> Preprocessing:
    values = dict(
        action_low=[-1.0, -0.5, 0.0],
        action_high=[1.0, 0.5, 0.0],
        state_mean=[0.1, 0.0, -0.2],
        state_std=[0.5, 0.25, 0.0],
        state_dim=3,
        control_hz=5.0,
    )
    return Preprocessing(**{**values, **changes})


def test_image_constants_are_open_clip_openai():
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    pre = make()
    assert pre.image_mean == list(OPENAI_DATASET_MEAN) and pre.image_std == list(OPENAI_DATASET_STD)
    assert pre.pad_color == (123, 117, 104)


def test_letterbox_keeps_full_view_of_wide_frames():
    frame = np.zeros((720, 1280, 3), np.uint8)
    frame[:, :40] = 255  # a white stripe at the far left edge must survive
    out = make().prepare_image(frame)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    # 1280 -> 224 wide, 720 -> 126 high, centred: bars of 49 rows above and below
    assert (out[:49] == (123, 117, 104)).all() and (out[-49:] == (123, 117, 104)).all()
    assert (out[49:175, 3] == 255).all() and (out[49:175, 100] == 0).all()  # 40 px -> 7 px


def test_center_crop_fills_the_square_and_cuts_the_sides():
    frame = np.zeros((720, 1280, 3), np.uint8)
    frame[:, :40] = 255
    out = make(resize_rule="center_crop").prepare_image(frame)
    assert out.shape == (224, 224, 3) and out.max() == 0  # the left stripe was cropped away


def test_224_frames_pass_unchanged_and_pil_input_works():
    frame = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    np.testing.assert_array_equal(make().prepare_image(frame), frame)
    rgba = Image.fromarray(np.full((100, 50, 4), 200, np.uint8), mode="RGBA")
    out = make().prepare_image(rgba)
    assert out.shape == (224, 224, 3) and (out[:, 112] == 200).all()
    np.testing.assert_array_equal(out, resize_frame(np.full((100, 50, 3), 200, np.uint8)))


@pytest.mark.parametrize(
    "image",
    [np.zeros((10, 10, 3), np.float32), np.zeros((10, 10), np.uint8), np.zeros((10, 10, 4), np.uint8), "frame.png"],
)
def test_prepare_image_refuses_bad_input(image):
    with pytest.raises(DataError, match="image: .*expected uint8 RGB"):
        make().prepare_image(image)


def test_actions_clip_scale_and_round_trip():
    pre = make()
    actions = np.array([[0.0, 0.25, 0.0], [2.0, -9.0, 3.0], [-1.0, 0.5, 0.0]], np.float32)  # [3, 3]
    norm = pre.normalise_actions(actions)
    np.testing.assert_allclose(norm, [[0.0, 0.5, 0.0], [1.0, -1.0, 0.0], [-1.0, 1.0, 0.0]], atol=1e-6)
    assert norm.dtype == np.float32
    inside = np.array([[0.3, -0.2, 0.0]], np.float32)
    np.testing.assert_allclose(pre.denormalise_actions(pre.normalise_actions(inside)), inside, atol=1e-6)
    np.testing.assert_allclose(pre.denormalise_actions([[5.0, -5.0, 5.0]]), [[1.0, -0.5, 0.0]])  # clipped
    batch = np.zeros((2, 4, 10, 3), np.float32)  # any leading shape [..., 3]
    assert pre.normalise_actions(batch).shape == (2, 4, 10, 3)


def test_state_standardised_and_constant_axis_kept_finite():
    pre = make()
    out = pre.normalise_state(np.array([[0.6, 0.25, 7.0]], np.float32))
    np.testing.assert_allclose(out, [[1.0, 1.0, 7.2]], atol=1e-6)
    with pytest.raises(DataError, match=r"state: shape \[1, 2\]: expected \[..., 3\]"):
        pre.normalise_state(np.zeros((1, 2)))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"window": 0}, r"Preprocessing.window = 0: expected an integer >= 1"),
        ({"resize_rule": "stretch"}, r"Preprocessing.resize_rule = 'stretch'"),
        ({"action_low": [0.0, 0.0]}, r"Preprocessing.action_low = \[0.0, 0.0\]: expected 3 finite numbers"),
        ({"action_high": [1.0, -1.0, 0.0]}, r"action_high .* below action_low .* on axis 1"),
        ({"state_std": [1.0, float("nan"), 1.0]}, r"Preprocessing.state_std"),
        ({"control_hz": 0}, r"Preprocessing.control_hz = 0"),
    ],
)
def test_invalid_fields_are_named(change, message):
    with pytest.raises(ConfigError, match=message):
        make(**change)


@pytest.mark.parametrize(
    "generator, rule",
    [
        ({"kind": "import", "format": "minuum-h5", "resize_rule": "center_crop"}, "center_crop"),
        ({"kind": "import", "format": "minuum-h5", "resize_rule": "letterbox"}, "letterbox"),
        ({"kind": "miniworld"}, "letterbox"),  # generated frames are already 224x224: the default
        (None, "letterbox"),
    ],
)
def test_from_manifest_takes_the_resize_rule_the_frames_were_made_with(generator, rule):
    manifest = {
        "stats": {"actions": {"q01": [-1.0, 0.0, -1.0], "q99": [1.0, 0.0, 1.0]}, "state": None},
        "state_dim": 0,
        "control_hz": 5.0,
        "generator": generator,
    }
    assert Preprocessing.from_manifest(manifest, None).resize_rule == rule


def test_from_manifest_save_load_and_pickle_keep_everything(tmp_path, tokenizer):
    manifest = {
        "stats": {
            "actions": {"q01": [-0.4, -0.3, -1.0], "q99": [0.8, 0.3, 1.0]},
            "state": {"mean": [0.1, 0.0, 0.0], "std": [0.2, 0.1, 0.5]},
        },
        "state_dim": 3,
        "control_hz": 5.0,
    }
    pre = Preprocessing.from_manifest(manifest, tokenizer, window=4, chunk=6)
    assert (pre.window, pre.chunk, pre.action_low, pre.state_std) == (4, 6, [-0.4, -0.3, -1.0], [0.2, 0.1, 0.5])
    texts = ["go to the red box", "navigate to the target avoiding the box on the left"]
    tokens = pre.tokenize(texts)
    assert set(tokens) == {
        "clip_input_ids",
        "kosmos_input_ids",
        "kosmos_attention_mask",
        "kosmos_image_embeds_position_mask",
    }
    assert all(v.dtype == np.int64 and v.shape[0] == 2 for v in tokens.values())

    pre.save(tmp_path / "pre")
    saved = json.loads((tmp_path / "pre" / PREPROCESSING_FILE).read_text())
    assert saved["resize_rule"] == "letterbox" and saved["tokenizer"] == "tokenizer" and saved["version"] == 1
    for copy in (Preprocessing.load(tmp_path / "pre"), pickle.loads(pickle.dumps(pre))):
        assert copy == pre and copy.to_dict() == pre.to_dict()
        for key, value in copy.tokenize(texts).items():
            np.testing.assert_array_equal(value, tokens[key])

    numbers_only = Preprocessing.load(tmp_path / "pre", with_tokenizer=False)  # what the serving ingress reads
    assert numbers_only.tokenizer is None and numbers_only == pre
    with pytest.raises(ModelError, match="tokenizer is None"):
        numbers_only.tokenize(texts)


def test_load_errors_and_missing_tokenizer(tmp_path):
    with pytest.raises(ModelError, match=r"preprocessing.json: missing"):
        Preprocessing.load(tmp_path)
    (tmp_path / PREPROCESSING_FILE).write_text(json.dumps({**make().to_dict(), "window": -2}))
    with pytest.raises(ModelError, match=r"preprocessing.json: Preprocessing.window = -2"):
        Preprocessing.load(tmp_path)
    pre = make()
    pre.save(tmp_path)
    assert Preprocessing.load(tmp_path) == pre and Preprocessing.load(tmp_path).tokenizer is None
    with pytest.raises(ModelError, match="tokenizer is None"):
        pre.tokenize(["go"])
