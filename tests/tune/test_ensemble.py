"""EnsemblePolicy: the combination rule, the MobileVLAPolicy interface, save/load, MLflow registration,
and that export + the ONNX backend take an ensemble exactly like a single policy."""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from mobile_vla.errors import ConfigError, ModelError
from mobile_vla.export.onnx_export import export_model
from mobile_vla.export.signature import STEP_INPUTS, STEP_OUTPUTS
from mobile_vla.policy import load_policy, save_policy
from mobile_vla.policy.ensemble import EnsemblePolicy
from mobile_vla.runtime.backends import load_backend
from mobile_vla.tracking import configure_mlflow, get_or_create_experiment, resolve_model
from mobile_vla.tune.ensemble_build import combine_policy_dirs, register_ensemble


def _frames(batch_size: int, frames: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (batch_size, frames, 224, 224, 3), dtype=np.uint8)
    state = rng.normal(size=(batch_size, frames, 3)).astype(np.float32)
    return torch.from_numpy(images), torch.from_numpy(state)


def _batch(preprocessing, batch_size=2, frames=3, seed=0):
    images, state = _frames(batch_size, frames, seed)
    tokens = preprocessing.tokenize(["go to the red box avoiding the barrel on the left"] * batch_size)
    return {"images": images, "state": state, **{k: torch.from_numpy(v) for k, v in tokens.items()}}


def _tokens(batch):
    return {k: v for k, v in batch.items() if k not in ("images", "state")}


def test_identical_members_give_the_member_itself(make_member, tiny_preprocessing):
    member = make_member(0)
    ensemble = EnsemblePolicy.from_members([member, copy.deepcopy(member), copy.deepcopy(member)])
    batch = _batch(tiny_preprocessing)
    with torch.no_grad():
        alone, together = member(batch), ensemble(batch)
    # no disagreement: mean = the member's action, mixture variance = its own, so the same confidence
    torch.testing.assert_close(together.actions, alone.actions, atol=1e-6, rtol=0)
    torch.testing.assert_close(together.log_var, alone.log_var, atol=1e-5, rtol=0)
    torch.testing.assert_close(together.confidence, alone.confidence, atol=1e-6, rtol=0)


def test_confidence_drops_where_members_disagree(make_member, tiny_preprocessing):
    """Three members, each confident alone (low predicted variance), identical except for how they read
    the robot state: on a robot whose state is zero they agree exactly, on a robot with a non-zero state
    they disagree. The ensemble keeps the members' confidence on the first and drops it on the second."""

    base = make_member(0)
    chunk = base.config.chunk
    with torch.no_grad():
        base.head[-1].bias[chunk * 3 :] = -8.0  # log-variance near its floor: every member is sure of itself
        base.head[-1].weight[: chunk * 3].mul_(5.0)  # a mean head that reacts strongly to what the LSTM sees
    members = [base, copy.deepcopy(base), copy.deepcopy(base)]
    with torch.no_grad():  # members 1 and 2 weigh the state differently; with state 0 this changes nothing
        members[1].fusion.state.weight += 2.0
        members[2].fusion.state.weight -= 2.0
    ensemble = EnsemblePolicy.from_members(members)

    images, _ = _frames(2, 1)
    images = images[:, 0]
    state = torch.tensor([[0.0, 0.0, 0.0], [1.0, -0.5, 0.8]])  # robot 0: agreement, robot 1: disagreement
    tokens = {k: torch.from_numpy(v) for k, v in tiny_preprocessing.tokenize(["go to the red box"] * 2).items()}
    with torch.no_grad():
        own = torch.stack([m.step(images, state, tokens)[1] for m in members])  # [M, B]
        member_actions = torch.stack([m.step(images, state, tokens)[0] for m in members])  # [M, B, K, 3]
        actions, confidence, _ = ensemble.step(images, state, tokens)
    assert torch.all(own > 0.9)  # each member alone: confident on both robots
    spread = member_actions.std(dim=0).mean(dim=(-2, -1))  # [B]
    assert spread[0] == 0 and spread[1] > 0.01
    torch.testing.assert_close(confidence[0], own[0, 0], atol=1e-6, rtol=0)  # agreement: unchanged
    assert confidence[1] < 0.75 * own[:, 1].min(), (confidence, own, spread)  # disagreement: the confidence falls
    torch.testing.assert_close(actions, member_actions.mean(dim=0), atol=1e-6, rtol=0)


def test_step_over_frames_equals_forward_and_memory_holds_every_member(make_member, tiny_preprocessing):
    members = [make_member(0), make_member(1, lstm_hidden=32), make_member(2, lstm_layers=2, lstm_hidden=16)]
    ensemble = EnsemblePolicy.from_members(members)
    # mixed lstm_layers: every member's [layers_m, B, hidden_m] state flattened into one row per robot
    assert (ensemble.config.lstm_layers, ensemble.config.lstm_hidden) == (1, 64 + 32 + 2 * 16)
    batch = _batch(tiny_preprocessing, frames=3)
    with torch.no_grad():
        window = ensemble(batch)
        clip_text = ensemble.encode_instruction(batch["clip_input_ids"])
        assert clip_text.shape == (2, 3 * members[0].clip.feature_dim) == (2, ensemble.clip.feature_dim)
        memory = ensemble.initial_memory(2)
        assert memory[0].shape == (1, 2, 128)
        for t in range(3):
            actions, confidence, memory = ensemble.step(
                batch["images"][:, t], batch["state"][:, t], _tokens(batch), memory, clip_text=clip_text
            )
        # the last member's own state, recovered from the joined memory, is its forward() state
        last_state = members[2](batch).memory
    torch.testing.assert_close(actions, window.actions[:, -1], atol=1e-5, rtol=0)
    torch.testing.assert_close(confidence, window.confidence[:, -1], atol=1e-5, rtol=0)
    torch.testing.assert_close(memory[0], window.memory[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(ensemble._split(memory)[2][0], last_state[0], atol=1e-5, rtol=0)


def test_members_must_share_chunk_state_and_tokenizer(make_member):
    with pytest.raises(ConfigError, match=r"members\[1\].chunk = 4: members must share chunk"):
        EnsemblePolicy.from_members([make_member(0), make_member(1, chunk=4)])
    with pytest.raises(ConfigError, match="at least 2"):
        EnsemblePolicy.from_members([make_member(0)])


def test_save_load_round_trip_is_kind_ensemble(tmp_path, make_member, tiny_preprocessing):
    ensemble = EnsemblePolicy.from_members([make_member(s) for s in range(3)], ["a", "b", "c"])
    save_policy(tmp_path / "policy", ensemble, tiny_preprocessing)
    document = json.loads((tmp_path / "policy" / "config.json").read_text())
    assert document["kind"] == "ensemble" and len(document["config"]["members"]) == 3
    assert document["config"]["sources"] == ["a", "b", "c"]
    loaded, preprocessing = load_policy(tmp_path)
    assert isinstance(loaded, EnsemblePolicy) and preprocessing.chunk == tiny_preprocessing.chunk
    batch = _batch(tiny_preprocessing)
    with torch.no_grad():
        assert torch.equal(loaded(batch).confidence, ensemble(batch).confidence)
    # a member config that no longer validates is a ModelError naming the file and the member
    document["config"]["members"][1]["chunk"] = 0
    (tmp_path / "policy" / "config.json").write_text(json.dumps(document))
    with pytest.raises(ModelError, match=r"config.json: kind = 'ensemble': members\[1\]"):
        load_policy(tmp_path)


def test_combining_saved_policies_checks_their_preprocessing(tmp_path, make_member, tiny_preprocessing):
    save_policy(tmp_path / "a" / "policy", make_member(0), tiny_preprocessing)
    save_policy(tmp_path / "b" / "policy", make_member(1), tiny_preprocessing)
    other = dataclasses.replace(tiny_preprocessing, action_high=[0.9, 0.3, 1.0])
    save_policy(tmp_path / "c" / "policy", make_member(2), other)
    ensemble, preprocessing = combine_policy_dirs([tmp_path / "a", tmp_path / "b"])
    assert len(ensemble.members) == 2 and preprocessing.action_high == tiny_preprocessing.action_high
    with pytest.raises(ModelError, match="preprocessing action_high"):
        combine_policy_dirs([tmp_path / "a", tmp_path / "c"])


@pytest.mark.slow  # a three-member ONNX export with parity: half a minute on a loaded 2-core box
def test_registered_ensemble_exports_and_serves_on_onnx_runtime(platform_home, make_member, tiny_preprocessing):
    """One MLflow version; `export_model` writes the same graph contract (only a wider state); the ONNX
    backend's answers match the torch backend's on the same version."""

    ensemble = EnsemblePolicy.from_members([make_member(s) for s in range(3)])
    client = MlflowClient(tracking_uri=configure_mlflow())
    run_id = client.create_run(get_or_create_experiment("tests")).info.run_id
    version = register_ensemble(ensemble, tiny_preprocessing, run_id, name="mobile-vla-policy", alias="challenger")
    resolved = resolve_model("models:/mobile-vla-policy@challenger")
    assert resolved.version == version
    assert client.get_model_version("mobile-vla-policy", version).tags["kind"] == "ensemble"
    loaded, _ = load_policy(resolved.path)
    assert isinstance(loaded, EnsemblePolicy)

    # the legacy exporter: the same graph contract as dynamo, a fraction of its export time on 2 cores
    result = export_model(resolved.path, name="mobile-vla-policy", version=version, exporter="legacy")
    signature = result.signature
    assert [s.name for s in signature.inputs] == list(STEP_INPUTS)
    assert [s.name for s in signature.outputs] == list(STEP_OUTPUTS)
    assert signature.recurrent.hidden == 3 * 64 and signature.recurrent.layers == 1
    assert max(signature.parity.fp32_max_abs_diff.values()) < 1e-4

    onnx = load_backend(resolved.path, prefer=("onnx-cpu",))
    reference = load_backend(resolved.path, prefer=("torch",))
    images, state = _frames(3, 2, seed=5)
    instructions = ["go to the red box", "go to the red box", "turn right and stop at the green ball"]
    memory_onnx = memory_torch = None
    for t in range(2):
        out = onnx.predict(images[:, t].numpy(), state[:, t].numpy(), instructions, memory_onnx)
        ref = reference.predict(images[:, t].numpy(), state[:, t].numpy(), instructions, memory_torch)
        memory_onnx, memory_torch = out.memory, ref.memory
        np.testing.assert_allclose(out.actions, ref.actions, atol=1e-4)
        np.testing.assert_allclose(out.confidence, ref.confidence, atol=1e-4)
    assert onnx.name == "onnx-cpu" and out.actions.shape == (3, tiny_preprocessing.chunk, 3)
    assert out.memory[0].shape == (1, 3, 192) and np.all((out.confidence > 0) & (out.confidence < 1))
