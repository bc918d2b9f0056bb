import json

import pytest
import torch

from mobile_vla.errors import ModelError
from mobile_vla.policy import build_policy, load_policy, save_policy


@pytest.fixture()
def tiny_model(tiny_config):
    torch.manual_seed(3)
    return build_policy(tiny_config).eval()


def _preprocessing(tokenizer):
    from mobile_vla.policy.preprocessing import Preprocessing

    return Preprocessing(
        action_low=[-0.5, -0.3, -1.0],
        action_high=[0.5, 0.3, 1.0],
        state_mean=[0.0, 0.0, 0.0],
        state_std=[1.0, 1.0, 1.0],
        tokenizer=tokenizer,
    )


def test_round_trip_gives_identical_outputs(tmp_path, tiny_model, tiny_config, tiny_tokenizer, make_batch):
    preprocessing = _preprocessing(tiny_tokenizer)
    save_policy(tmp_path / "model" / "policy", tiny_model, preprocessing)
    document = json.loads((tmp_path / "model" / "policy" / "config.json").read_text())
    assert document["kind"] == "policy" and document["config"]["preset"] == "tiny"

    loaded, loaded_pre = load_policy(tmp_path / "model")  # the parent folder holding policy/ works too
    batch = make_batch(tiny_config, tiny_tokenizer, batch_size=2, frames=3)
    with torch.no_grad():
        want, got = tiny_model(batch), loaded(batch)
    assert torch.equal(want.actions, got.actions) and torch.equal(want.confidence, got.confidence)
    assert loaded.config == tiny_config and not loaded.training
    # preprocessing (with its tokenizer) comes back from the same folder
    assert loaded_pre.action_high == preprocessing.action_high
    assert (
        loaded_pre.tokenize(["go to the box"])["kosmos_input_ids"]
        == tiny_tokenizer.encode(["go to the box"])["kosmos_input_ids"]
    ).all()


def test_folder_without_preprocessing_loads_with_none(tmp_path, tiny_model):
    save_policy(tmp_path, tiny_model)
    assert not list(tmp_path.glob("*.partial"))
    _, preprocessing = load_policy(tmp_path)
    assert preprocessing is None


def test_weights_of_another_config_are_a_model_error(tmp_path, tiny_model, tiny_config):
    save_policy(tmp_path, tiny_model)
    document = json.loads((tmp_path / "config.json").read_text())
    document["config"]["lstm_hidden"] = 32
    (tmp_path / "config.json").write_text(json.dumps(document))
    with pytest.raises(ModelError, match="model.safetensors: does not match config.json"):
        load_policy(tmp_path)


def test_corrupt_or_missing_files_are_model_errors(tmp_path, tiny_model):
    save_policy(tmp_path, tiny_model)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelError, match="model.safetensors"):
        load_policy(tmp_path)
    weights.unlink()
    with pytest.raises(ModelError, match="model.safetensors: missing"):
        load_policy(tmp_path)
    (tmp_path / "config.json").write_text('{"kind": "mixture-of-experts", "format_version": 1, "config": {}}')
    with pytest.raises(ModelError, match="kind = 'mixture-of-experts'"):
        load_policy(tmp_path)
    (tmp_path / "config.json").write_text('{"kind": "policy", "format_version": 9, "config": {}}')
    with pytest.raises(ModelError, match="format_version = 9"):
        load_policy(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="config.json: not valid JSON"):
        load_policy(tmp_path)
    with pytest.raises(ModelError, match="no config.json"):
        load_policy(tmp_path / "elsewhere")


def test_checkpoint_holds_no_pickle(tmp_path, tiny_model):
    save_policy(tmp_path, tiny_model)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["config.json", "model.safetensors"]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as handle:
        assert "lstm.weight_ih_l0" in handle.keys()
